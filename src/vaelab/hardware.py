"""What the machine a run is on does well, asked in one place, and the training precision
that follows from it.

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

#: trainer.precision's own value in vaelab: bf16-mixed where bfloat16 is native, else 32-true
BF16_AUTO = "bf16-auto"


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native on `device` (see the module's docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(private_api(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "torch")())


def training_device(accelerator: object) -> torch.device | None:
    """The device kind a Trainer with this `accelerator` trains on (None: not CPU or CUDA)."""
    if accelerator in ("cpu",):
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return None


def trainer_precision(requested: object, native: bool, device_type: str) -> tuple[object, str]:
    """(the precision to train with, a line to print or ""), from trainer.precision as asked,
    whether bfloat16 is native on the device, and the device's type. `bf16-auto` (what the
    presets ask for) is bf16-mixed where bfloat16 is native and 32-true elsewhere, saying so;
    bfloat16 asked for explicitly on a CPU without it is kept, with the warning of what it
    costs there (benchmarks/README.md, "bfloat16 on a CPU without it")."""
    if requested == BF16_AUTO:
        if native:
            return "bf16-mixed", ""
        return "32-true", (
            f"trainer.precision={BF16_AUTO}: this {device_type.upper()} has no native "
            "bfloat16, so the run trains in float32 (32-true)"
        )
    if str(requested).startswith("bf16") and device_type == "cpu" and not native:
        return requested, (
            f"trainer.precision={requested} on a CPU without native bfloat16 (AVX512-BF16, "
            "AMX): bfloat16 is emulated there, and training is about 10x slower than in float32 "
            "(experiment=mnist_cpu_budget: 6.4 against 68 steps/s, benchmarks/README.md); "
            f"trainer.precision={BF16_AUTO} or 32-true avoids it"
        )
    return requested, ""
