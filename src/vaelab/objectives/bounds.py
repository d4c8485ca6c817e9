"""The bounds: the ELBO (with KL schedules, free bits and the DReG estimator) and the
importance-weighted bound (Burda et al. 2015), as training objectives and as the evaluation's
estimate of log p(x) (`iwae_bound`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import require, require_number
from vaelab.models import LatentVariableModel
from vaelab.models.base import stopped
from vaelab.objectives.base import (
    KLSchedule,
    Objective,
    bound_parts,
    check_estimator,
    scale_code_gradients,
)


class ELBO(Objective):
    """Negative (beta-weighted) evidence lower bound with L = `n_samples` Monte-Carlo samples.

    `free_bits` = lambda > 0 (Kingma et al. 2016): the rate term of the loss is
    sum_d max(lambda, KL_d), KL_d the batch mean of dimension d's KL, so dimensions below lambda
    nats get no gradient towards the prior. The reported rate and ELBO are always the true,
    un-clamped ones.
    """

    def __init__(
        self,
        beta: float = 1.0,
        n_samples: int = 1,
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
        free_bits: float = 0.0,
        estimator: str = "standard",
    ) -> None:
        require(
            isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1,
            f"objective.n_samples must be an integer >= 1, got {n_samples}",
        )
        require_number("objective.free_bits", free_bits, 0)
        check_estimator(estimator)
        require(
            estimator == "standard" or free_bits == 0,
            "objective.estimator=dreg differentiates the Monte-Carlo rate, which free bits "
            "(a clamp on the closed-form KL per dimension) replace; use free_bits=0 with it",
        )
        self.estimator = estimator
        self.schedule = KLSchedule(
            beta, kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ratio
        )
        self.n_samples = n_samples
        self.free_bits = float(free_bits)

    @property
    def beta(self) -> float:
        return self.schedule.beta

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        q = model.posterior(x)  # batch (B,)
        prior = model.prior()
        z = q.rsample((self.n_samples,))  # (L, B, ...)
        distortion = -model.log_likelihood(target, z).mean(0)  # (B,)
        rate = model.rate(q, prior, z)  # (B,)
        if self.free_bits > 0:
            per_dim = model.rate_per_dim(q, prior)
            require(
                per_dim is not None,
                f"objective.free_bits needs a KL per latent dimension, which this prior has not "
                f"({type(prior).__name__}); use free_bits=0 or a factorised prior",
            )
            penalty = per_dim.mean(0).clamp(min=self.free_bits).sum()
        else:
            penalty = rate.mean()
        beta = self.schedule(step)
        loss = distortion.mean() + beta * penalty
        if self.estimator == "dreg":
            path_rate = (stopped(q).log_prob(z) - prior.log_prob(z)).mean(0)
            surrogate = distortion.mean() + beta * path_rate.mean()
            loss = loss.detach() + surrogate - surrogate.detach()
        return bound_parts(
            loss,
            distortion,
            rate,
            beta=torch.as_tensor(beta, dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return (
            f"ELBO(beta={self.beta}, n_samples={self.n_samples}, free_bits={self.free_bits}, "
            f"estimator={self.estimator!r})"
        )


class IWAE(Objective):
    """Importance-weighted autoencoder bound (Burda et al. 2015) as the training objective.

    loss = -L_k = -log (1/k) sum_i p(x, z_i) / q(z_i|x) with k reparameterised draws, so the
    gradient flows through every sample, weighted by its normalised importance weight. With k=1
    it is the single-sample ELBO with a Monte-Carlo KL. Also reports the ELBO (the model's rate,
    beta=1, from the same draws' likelihoods) and `iwae` = L_k, per example. A KL warm-up
    (`kl_warmup_steps`, or a cyclical schedule, as the ELBO's; target 1) trains on the weights
    p(x|z) (p(z) / q(z|x))^beta while beta < 1; `iwae` stays L_k at beta = 1.

    `estimator=dreg` (doubly reparameterised, Tucker et al. 2018): the same bound, differentiated
    so that q(z|x)'s parameters get sum_i w_i^2 d log w_i / d z_i dz_i/dphi (w the normalised
    weights, log w computed with q's parameters cut from the graph) and the model's parameters
    the standard sum_i w_i grad log w_i. The score-function terms it drops have zero expectation;
    the inference network's gradient no longer loses its signal-to-noise ratio as k grows
    (Rainforth et al. 2018). Implemented as a surrogate with the bound's value and a hook on the
    codes that multiplies the gradient reaching z_i by w_i, so the decoder runs once.
    """

    def __init__(
        self,
        k: int = 50,
        estimator: str = "standard",
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
    ) -> None:
        require(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1,
            f"objective.k must be an integer >= 1, got {k}",
        )
        check_estimator(estimator)
        self.k = k
        self.estimator = estimator
        self.schedule = KLSchedule(
            1.0, kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ratio
        )

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        q = model.posterior(x)
        prior = model.prior()
        z = q.rsample((self.k,))  # (k, B, ...)
        log_px = model.log_likelihood(target, z)  # (k, B)
        log_ratio = q.log_prob(z) - prior.log_prob(z)  # (k, B)
        log_w = log_px - log_ratio
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)  # (B,)
        distortion = -log_px.mean(0)
        rate = model.rate(q, prior, z, log_ratio)
        # KL warm-up: weights p(x|z) (p(z)/q(z|x))^beta while beta ramps to 1 (the bound of the
        # annealed joint); L_k itself is reported at beta = 1
        beta = self.schedule(step)
        if self.schedule.constant:
            loss = -bound.mean()
        else:
            tempered = log_px - beta * log_ratio
            loss = -(torch.logsumexp(tempered, dim=0) - math.log(self.k)).mean()
        if self.estimator == "dreg":
            path_ratio = stopped(q).log_prob(z) - prior.log_prob(z)
            path_log_w = log_px - beta * path_ratio  # the trained weights' values
            weights = torch.softmax(path_log_w.detach(), dim=0)  # (k, B), normalised over k
            scale_code_gradients(z, weights)  # w_i once more on the path into q's parameters
            surrogate = -(weights * path_log_w).sum(0).mean()
            loss = loss.detach() + surrogate - surrogate.detach()
        return bound_parts(
            loss,
            distortion,
            rate,
            iwae=bound.detach(),
            beta=torch.as_tensor(beta, dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return f"IWAE(k={self.k}, estimator={self.estimator!r}, schedule={self.schedule!r})"


def diagonal_gaussian(d: Distribution) -> bool:
    """torch's own diagonal Gaussian, Independent(Normal) (not a subclass, a flow or a mixture)."""
    return type(d) is Independent and type(d.base_dist) is Normal


def draw_codes(q: Distribution, n: int) -> Tensor:
    """n draws from q, (n, *batch, *event). A diagonal Gaussian draws through `rsample`: the same
    numbers as `sample` (standard normals, times the scale, plus the mean), without the check
    that torch.normal makes at every call that no scale is negative (a reduction over all the
    draws; benchmarks/README.md has what it costs)."""
    return q.rsample((n,)) if diagonal_gaussian(q) else q.sample((n,))


#: log w = log p(x, z) - log q(z|x) from (x, codes z, posterior q, prior p): the model's
#: `log_weights`, or a compiled version of it (vaelab.evaluation.metrics.CompiledLogWeights).
LogWeightsFn = Callable[[Tensor, Tensor, Distribution, Distribution], Tensor]


@torch.no_grad()
def iwae_bound(
    model: LatentVariableModel,
    x: Tensor,
    k: int,
    max_codes: int = 5000,
    inputs: Tensor | None = None,
    weights_fn: LogWeightsFn | None = None,
    prior: Distribution | None = None,
) -> dict[str, Tensor]:
    """Importance-weighted bound L_k (Burda et al. 2015) per example, and the ELBO from the same
    weights.

    L_k = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): a lower bound on log p(x) that
    increases with k (L_1 = ELBO); -L_k at k=5000 is the standard estimate of -log p(x). The k
    samples are drawn in chunks of at most `max_codes` codes per decoder call (chunk of samples
    times batch size), combined with a running log-sum-exp, so memory stays bounded for any k.
    Returns `log_likelihood` (L_k) and `elbo` (the mean log-weight, a Monte-Carlo ELBO), each (B,).
    The proposal is q(z|inputs) (default x): any proposal gives an unbiased estimate of p(x), so
    a denoising model's q(z|noisy x) estimates the likelihood of the clean x. `weights_fn`
    replaces `model.log_weights`, e.g. by a compiled version of it; the codes are drawn outside
    it, so both see the same random numbers. `prior` is p(z) if the caller built it already (a
    VampPrior encodes its pseudo-inputs to build it); else it is built once for all chunks.
    """
    require(isinstance(k, int) and k >= 1, f"eval.k must be an integer >= 1, got {k!r}")
    if weights_fn is None:
        weights_fn = model.log_weights
    q = model.posterior(x if inputs is None else inputs)
    p = model.prior() if prior is None else prior
    if getattr(q, "point_mass", False):
        k = 1  # every draw is the same code (a VQ-VAE): one weight is the k-sample estimate
    chunk = max(1, min(k, max_codes // len(x)))
    log_sum = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
    weight_sum = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    for start in range(0, k, chunk):
        z = draw_codes(q, min(chunk, k - start))  # (n, B, ...)
        log_w = weights_fn(x, z, q, p)  # (n, B)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
        weight_sum += log_w.sum(0)
    return dict(log_likelihood=log_sum - math.log(k), elbo=weight_sum / k)
