"""torch.compile behind one switch per compiled thing (`compile`: the training step; `eval.compile`:
the importance-sampled evaluation's log-likelihood), with one fallback: if the compiler fails,
one warning, and the function runs eagerly from then on (the numbers are the same up to float
rounding).

The inductor options used on a CPU are kept here, in one place (`CPU_OPTIONS`), each with the
reason it is worth a dependency on inductor's option names; `tests/test_training_options.py`
fails with their names when a torch release drops one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from vaelab.errors import VaelabError

log = logging.getLogger(__name__)
#: inductor options for graphs that run on a CPU (benchmarks/README.md has the figures):
#: - cpp.use_decompose_tanh: tanh as 2 / (1 + exp(-2x)) - 1, faster than the library's
#:   vectorised tanh (its relative error near 0 does not matter for activations: the absolute
#:   error stays below 2e-7);
#: - cpp_wrapper: the graph's calls run from generated C++ instead of Python (a training step
#:   makes several; an evaluation chunk one).
CPU_OPTIONS = {"cpp.use_decompose_tanh": True, "cpp_wrapper": True}


def cpu_options(*names: str) -> dict[str, Any]:
    """The `CPU_OPTIONS` named that this torch's inductor knows (`torch._inductor.list_options`,
    the documented listing of what `torch.compile(options=...)` takes)."""
    known = set(torch._inductor.list_options())
    return {name: CPU_OPTIONS[name] for name in names if name in known}


def warn_compile_failed(setting: str, error: Exception, fallback: str) -> None:
    """The one warning when torch.compile fails and the caller goes on eagerly."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    log.warning(
        "%s: torch.compile failed (%s: %s); %s",
        setting,
        type(error).__name__,
        first_line[:200],
        fallback,
    )


class Compiled:
    """`fn` through torch.compile (static shapes: one compilation per input shape), built at
    the first call; on a failure of the compiler stack, one warning naming `setting`, and `fn`
    itself from then on. A VaelabError raised by `fn` (its own checks) passes through."""

    def __init__(
        self, fn: Callable[..., Any], setting: str, options: dict[str, Any], fallback: str
    ) -> None:
        """`fallback`: what the warning says happens instead (e.g. "training eagerly")."""
        self.fn, self.setting, self.options, self.fallback = fn, setting, options, fallback
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:  # not in __init__: whatever holds this stays picklable
            self.compiled = torch.compile(self.fn, dynamic=False, options=self.options)
        try:  # compilation happens on a call: the first, and any with a new shape
            return self.compiled(*args)
        except VaelabError:
            raise
        except Exception as e:  # any failure of the compiler stack: fall back, do not stop
            warn_compile_failed(self.setting, e, self.fallback)
            self.failed = True
            return self.fn(*args)


class CompiledObjective:
    """The training step's objective through torch.compile (`compile=true`): the model's forward
    pass (encoder, reparameterised draws, decoder, the likelihood's log-density, the KL) and the
    loss become one graph, its backward pass another, so that the element-wise work between the
    matrix products runs as a few fused loops. The first step runs eagerly: it fills
    torch.distributions' cache of which KL function serves which pair of distributions, a lookup
    the compiler cannot trace. The step counter goes in as a 0-d tensor, so a KL schedule's
    beta changes without recompiling; draws come from torch's generator as in eager mode
    (`fallback_random`), so seeds and exact resume behave as without it. Only the loss is
    differentiated: the other parts leave the graph as plain values."""

    def __init__(self, objective: Callable[..., dict[str, torch.Tensor]]) -> None:
        self.objective = objective
        self.compiled: Compiled | None = None

    def loss_only(self, model, inputs, targets, step) -> dict[str, torch.Tensor]:
        parts = self.objective(model, inputs, targets, step=step)
        return {
            name: v.detach() if name != "loss" and isinstance(v, torch.Tensor) else v
            for name, v in parts.items()
        }

    def __call__(self, model, inputs, targets, step: int) -> dict[str, torch.Tensor]:
        if self.compiled is None:
            options = {"fallback_random": True}
            if inputs.device.type == "cpu":
                options |= cpu_options(*CPU_OPTIONS)
            self.compiled = Compiled(self.loss_only, "compile", options, "training eagerly")
            return self.objective(model, inputs, targets, step=step)
        return self.compiled(model, inputs, targets, torch.tensor(step, device=inputs.device))
