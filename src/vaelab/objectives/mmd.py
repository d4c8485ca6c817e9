"""Objectives that fit the aggregate posterior q(z) = E_x q(z|x) to the prior with a maximum mean
discrepancy: WAE-MMD (Tolstikhin et al. 2018) and InfoVAE / MMD-VAE (Zhao, Song & Ermon 2017).

MMD^2(Q, P) = E k(z, z') + E k(y, y') - 2 E k(z, y), z, z' ~ Q and y, y' ~ P independent, is
estimated on a batch's codes z_1..n ~ q(z) and n draws y_1..n ~ p(z) by the unbiased U-statistic
(Gretton et al. 2012; Tolstikhin et al.'s Algorithm 2 and code):

    sum_{i != j} k(z_i, z_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
    - 2 sum_{i, j} k(z_i, y_j) / n^2.

Kernels, on squared distances d = |z - y|^2, summed over `scales` s (each a multiple of C):
- `imq`: C s / (C s + d), the inverse multiquadratic (the WAE paper's);
- `rbf`: exp(-d / (C s)).
C is the bandwidth: `wae` sets C = 2 D sigma^2 (D latent dimensions, sigma^2 the prior's
variance per dimension, 1 for N(0, I): the expected squared distance between two prior draws;
Tolstikhin et al.), `infovae` C = D^2 (Zhao et al.'s code: exp(-mean_d (z_d - y_d)^2 / D)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vaelab.errors import require, require_number
from vaelab.models import LatentVariableModel
from vaelab.objectives.base import KLSchedule, Objective, bound_parts

KERNELS = ("imq", "rbf")
BANDWIDTHS = ("wae", "infovae")


def kernel_sum(d: Tensor, kernel: str, widths: Sequence[float]) -> Tensor:
    """The kernel at squared distances d, summed over the widths C s."""
    total = torch.zeros_like(d)
    for c in widths:
        total = total + (c / (c + d) if kernel == "imq" else torch.exp(-d / c))
    return total


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2 (n, m) from norms and one matrix product, without the square root whose
    gradient is undefined at the zero distances of the diagonal."""
    return (a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2 * a @ b.T).clamp(min=0)


def mmd_unbiased(z: Tensor, y: Tensor, kernel: str, widths: Sequence[float]) -> Tensor:
    """The unbiased estimate of MMD^2 between the samples z (n, D) and y (m, D), n, m >= 2."""
    n, m = len(z), len(y)
    k_zz = kernel_sum(squared_distances(z, z), kernel, widths)
    k_yy = kernel_sum(squared_distances(y, y), kernel, widths)
    k_zy = kernel_sum(squared_distances(z, y), kernel, widths)
    within_z = (k_zz.sum() - k_zz.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_z + within_y - 2 * k_zy.mean()


class MMDObjective(Objective):
    """loss = distortion + kl_weight(step) * rate + mmd_weight * MMD^2(q(z), p(z)), per batch.

    The codes are one reparameterised draw z ~ q(z|x) per example (`codes: sample`) or the
    posterior means (`codes: mean`, a deterministic encoder as in the WAE paper's MNIST runs);
    the prior draws are `p(z).sample`, as many as the batch (no gradient reaches a learned
    prior's parameters through them). The reported `elbo`, `rate` and `distortion` are the ELBO's
    (beta = 1), `mmd` the batch's estimate; evaluate.py's importance-sampled log-likelihood uses
    q(z|x) as its proposal, a valid bound for any encoder with a density."""

    CODES = ("sample", "mean")

    def __init__(
        self,
        mmd_weight: float,
        kl_weight: float = 0.0,
        kernel: str = "imq",
        bandwidth: str = "wae",
        scales: Sequence[float] = (1.0,),
        codes: str = "sample",
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
    ) -> None:
        require_number("objective.mmd_weight", mmd_weight, 0)
        require_number("objective.kl_weight", kl_weight, 0)
        require(
            kernel in KERNELS,
            f"objective.kernel must be one of {', '.join(KERNELS)}, got {kernel!r}",
        )
        require(
            bandwidth in BANDWIDTHS,
            f"objective.bandwidth must be one of {', '.join(BANDWIDTHS)}, got {bandwidth!r}",
        )
        scales = list(scales)
        require(
            len(scales) >= 1
            and all(
                isinstance(s, int | float) and not isinstance(s, bool) and s > 0 for s in scales
            ),
            f"objective.scales must be a list of positive numbers, got {scales!r}",
        )
        require(
            codes in self.CODES,
            f"objective.codes must be one of {', '.join(self.CODES)}, got {codes!r}",
        )
        self.mmd_weight, self.kl_weight = float(mmd_weight), float(kl_weight)
        self.kernel, self.bandwidth, self.scales, self.codes = kernel, bandwidth, scales, codes
        self.schedule = KLSchedule(
            self.kl_weight, kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ratio
        )

    def check_model(self, model: LatentVariableModel) -> None:
        require(
            model.flat_code_dim is not None,
            f"objective={type(self).__name__.lower()} compares codes with prior draws as flat "
            f"vectors: it needs one flat latent vector (model=mlp, conv, resnet), got "
            f"{type(model).__name__}",
        )

    def widths(self, prior, draws: Tensor) -> list[float]:
        """C s for each scale s (see the module docstring); the prior's variance per dimension
        is its own where torch knows it (Gaussian, mixtures), else the draws'."""
        d = draws.shape[-1]
        if self.bandwidth == "infovae":
            return [float(d * d) * s for s in self.scales]
        try:
            variance = prior.variance.mean().item()
        except NotImplementedError:
            variance = draws.var(0).mean().item()
        return [2.0 * d * variance * s for s in self.scales]

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        q = model.posterior(x)
        prior = model.prior()
        z = q.rsample() if self.codes == "sample" else q.mean  # (B, D)
        distortion = -model.log_likelihood(target, z[None]).mean(0)  # (B,)
        drawn = z if self.codes == "sample" else q.rsample()  # the rate's draw (for mixtures)
        rate = model.rate(q, prior, drawn[None])
        with torch.no_grad():
            draws = prior.sample((len(z),)).to(z)
            widths = self.widths(prior, draws)
        mmd = mmd_unbiased(z, draws, self.kernel, widths)
        loss = distortion.mean() + self.schedule(step) * rate.mean() + self.mmd_weight * mmd
        return bound_parts(loss, distortion, rate, mmd=mmd.detach())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mmd_weight={self.mmd_weight}, kl_weight={self.schedule!r}, "
            f"kernel={self.kernel!r}, bandwidth={self.bandwidth!r}, scales={self.scales}, "
            f"codes={self.codes!r})"
        )


class WAE(MMDObjective):
    """WAE-MMD (Tolstikhin et al. 2018): distortion + lambda MMD^2(q(z), p(z)), no KL; the IMQ
    kernel summed over the code's seven scales of C = 2 D sigma^2 (tolstikhin/wae, wae.py),
    lambda = 10 as for MNIST there. The paper's MNIST encoder is deterministic
    (`codes: mean`); the default draws z ~ q(z|x), the random-encoder WAE the paper also allows,
    which keeps q(z|x) a proposal for the likelihood estimate. The paper's cost is a squared
    error (0.05 |x - G(z)|^2 in its code); here the distortion is the likelihood's -log p(x|z),
    so lambda weighs nats."""

    def __init__(
        self,
        lam: float = 10.0,
        kernel: str = "imq",
        scales: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
        codes: str = "sample",
        bandwidth: str = "wae",
    ) -> None:
        super().__init__(
            mmd_weight=lam, kernel=kernel, bandwidth=bandwidth, scales=scales, codes=codes
        )
        self.lam = float(lam)


class InfoVAE(MMDObjective):
    """InfoVAE (Zhao, Song & Ermon 2017): distortion + (1 - alpha) KL(q(z|x) || p(z)) +
    (alpha + lambda - 1) MMD^2(q(z), p(z)), with alpha weighing the mutual information between x
    and z and lambda the divergence of the aggregate posterior. alpha = 1 is the MMD-VAE of the
    authors' tutorial code (no KL); the default alpha = 0, lambda = 1000 is pythae's MNIST
    configuration (ELBO + 999 MMD^2). RBF kernel with the authors' bandwidth (C = D^2)."""

    def __init__(
        self,
        alpha: float = 0.0,
        lam: float = 1000.0,
        kernel: str = "rbf",
        scales: Sequence[float] = (1.0,),
        bandwidth: str = "infovae",
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
    ) -> None:
        require(
            isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha <= 1,
            f"objective.alpha must be a number <= 1 (the KL's weight is 1 - alpha), got {alpha!r}",
        )
        require_number("objective.lam", lam, 0)
        require(
            alpha + lam - 1 >= 0,
            f"objective.alpha + objective.lam - 1 is the MMD's weight and must be >= 0, got "
            f"alpha={alpha}, lam={lam}",
        )
        super().__init__(
            mmd_weight=alpha + lam - 1,
            kl_weight=1 - alpha,
            kernel=kernel,
            bandwidth=bandwidth,
            scales=scales,
            kl_schedule=kl_schedule,
            kl_warmup_steps=kl_warmup_steps,
            kl_cycle_steps=kl_cycle_steps,
            kl_cycle_ratio=kl_cycle_ratio,
        )
        self.alpha, self.lam = float(alpha), float(lam)
