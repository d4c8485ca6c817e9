"""The objective protocol: an objective is called as `objective(model, x, target=None,
step=None)` and returns named parts, each (B,) per example, and `loss`, the batch mean to
minimise; what else an objective can do is declared here with its default, so generic code reads
the protocol instead of probing for methods.
"""

from __future__ import annotations

from torch import Tensor

from vaelab.errors import require, require_int, require_number


class Objective:
    """Base class of vaelab's objectives (plain classes; those with modules or buffers of their
    own are also `torch.nn.Module`s). The capabilities, with their defaults:"""

    #: evaluate.py estimates log p(x) of a model trained with it (False: a deterministic
    #: autoencoder has no density over its codes).
    probabilistic: bool = True
    #: it trains the codes of a vector-quantised model (a model that needs such an objective
    #: checks this, `LatentVariableModel.check_objective`).
    trains_codes: bool = False

    def check_model(self, model) -> None:
        """Refuse, with one line, a model this objective cannot train."""

    def bind(self, model) -> None:
        """Build what the objective owns for this model (FactorVAE's discriminator), before any
        training, checkpoint loading or optimizer; called once by build.py."""

    def setup(self, train_size: int) -> None:
        """What the objective needs of the training data (beta-TCVAE's N), when training
        starts."""

    def param_groups(self) -> list[dict]:
        """Parameter groups of the objective's own modules, with their optimizer settings."""
        return []

    def __call__(
        self, model, x: Tensor, target: Tensor | None = None, step: int | Tensor | None = None
    ) -> dict[str, Tensor]:
        """The parts for inputs x (what the encoder sees) and targets (what the likelihood
        scores, default x; they differ for a denoising autoencoder); `step` drives a KL schedule
        (None: the target beta)."""
        return self.parts(model, x, x if target is None else target, step)

    def parts(self, model, x: Tensor, target: Tensor, step: int | Tensor | None) -> dict:
        raise NotImplementedError


def bound_parts(loss: Tensor, distortion: Tensor, rate: Tensor, **extra: Tensor) -> dict:
    """What an objective on the ELBO's scale reports: the loss to minimise, elbo = -(distortion
    + rate) with beta = 1 whatever the objective weighs, rate and distortion (each (B,)), and its
    own parts."""
    return dict(loss=loss, elbo=-(distortion + rate), rate=rate, distortion=distortion, **extra)


#: Gradient estimators of the bounds: `standard` differentiates the Monte-Carlo bound as written;
#: `dreg` (Tucker et al. 2018) drops the score-function terms of q(z|x)'s parameters, whose
#: expectation is zero, and keeps the path derivatives through the codes.
ESTIMATORS = ("standard", "dreg")


def check_estimator(estimator: str) -> None:
    require(
        estimator in ESTIMATORS,
        f"objective.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}",
    )


def scale_code_gradients(z: Tensor, weights: Tensor) -> None:
    """Multiply the gradient reaching each code z_i (S, B, ...) by weights (S, B): the second
    factor of DReG's squared normalised weights, applied where the path derivative enters."""
    if z.requires_grad:
        shaped = weights.detach().reshape(*weights.shape, *([1] * (z.dim() - weights.dim())))
        z.register_hook(lambda grad: grad * shaped)


class KLSchedule:
    """The rate weight beta(step): constant, linear warm-up, or cyclical.

    - `linear` with `warmup_steps` = W > 0: beta * min(1, step / W), KL annealing from 0 to beta
      (Bowman et al. 2016); with W = 0, the constant beta.
    - `cyclical` (Fu et al. 2019): the step's position tau in its cycle of `cycle_steps` steps;
      beta * min(1, tau / ratio): a linear ramp over the first `ratio` of each cycle, then beta.
    """

    SCHEDULES = ("linear", "cyclical")

    def __init__(
        self,
        beta: float = 1.0,
        schedule: str = "linear",
        warmup_steps: int = 0,
        cycle_steps: int = 10000,
        cycle_ratio: float = 0.5,
    ) -> None:
        require_number("objective.beta", beta, 0)
        require(
            schedule in self.SCHEDULES,
            f"objective.kl_schedule must be one of {', '.join(self.SCHEDULES)}, got {schedule!r}",
        )
        require_int("objective.kl_warmup_steps", warmup_steps, 0)
        require_int("objective.kl_cycle_steps", cycle_steps, 1)
        require(
            0 < cycle_ratio <= 1, f"objective.kl_cycle_ratio must be in (0, 1], got {cycle_ratio}"
        )
        self.beta = float(beta)
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.cycle_steps = cycle_steps
        self.cycle_ratio = cycle_ratio

    @property
    def constant(self) -> bool:
        return self.schedule == "linear" and self.warmup_steps == 0

    def __repr__(self) -> str:
        if self.constant:
            return f"{self.beta}"
        if self.schedule == "linear":
            return f"linear(0 -> {self.beta} over {self.warmup_steps} steps)"
        return f"cyclical({self.beta}, every {self.cycle_steps} steps, ramp {self.cycle_ratio})"

    def __call__(self, step: int | Tensor | None) -> float | Tensor:
        """beta at a training step; None (evaluation) gives the target beta. A 0-d tensor step
        (the compiled training step's, so that one graph serves every step) gives a tensor."""
        if step is None or self.constant:
            return self.beta
        if self.schedule == "cyclical":
            tau = (step % self.cycle_steps) / self.cycle_steps
            ramp = tau / self.cycle_ratio
        else:
            ramp = step / self.warmup_steps
        if isinstance(ramp, Tensor):
            return self.beta * ramp.clamp(max=1.0)
        return self.beta * min(1.0, ramp)
