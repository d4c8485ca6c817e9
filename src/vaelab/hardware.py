"""What the machine a run is on does well, asked in one place.

`native_bf16(device)`: whether bfloat16 matrix products are native there (a GPU that supports
bfloat16; a CPU with AVX512-BF16 or AMX). On a CPU without it, oneDNN emulates bfloat16 and a
matrix product takes several times as long as in float32 (benchmarks/README.md), so vaelab
chooses bfloat16 for its own inference passes only where this is true. torch has no public
question for the CPU case; `torch.ops.mkldnn._is_mkldnn_bf16_supported` is the one it uses
itself, and `tests/test_trust.py::test_the_private_names_vaelab_relies_on_exist` names it
when a release drops it.
"""

from __future__ import annotations

import torch

from vaelab.errors import private_api


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native on `device` (see the module's docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(private_api(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "torch")())
