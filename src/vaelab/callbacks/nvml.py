"""Lightning turns on torch's NVML-based CUDA check when it is imported
(`PYTORCH_NVML_BASED_CUDA_CHECK=1`: `torch.cuda.is_available()` through NVML does not initialise
CUDA, so processes forked later can still use the GPU). Where NVML is absent (no NVIDIA driver),
that check fails to load the library and falls back to the CUDA runtime call torch's default
check makes, on every call; and the optimizer calls it at every step (torch.optim's graph-capture
health check). A failed library load per step buys no fork safety there, and costs a few percent
of a small model's step (benchmarks/README.md). This callback, the one place vaelab touches that
switch, turns it off for the fit where the library cannot be loaded, and puts it back when the
fit ends (the same answer either way).
"""

from __future__ import annotations

import ctypes
import os

import lightning as L

#: torch's switch for an NVML-based torch.cuda.is_available()
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def nvml_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the library torch's NVML check loads
    except OSError:
        return False
    return True


class NoFailingNvmlCheck(L.Callback):
    def __init__(self) -> None:
        self.saved: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if os.environ.get(NVML_CHECK) == "1" and not nvml_loads():
            self.saved = os.environ.pop(NVML_CHECK)

    def restore(self) -> None:
        if self.saved is not None:
            os.environ[NVML_CHECK] = self.saved
            self.saved = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()
