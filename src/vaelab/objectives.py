"""Training objectives with named parts, in nats per example.

ELBO (Kingma & Welling 2013):  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x).

- distortion = -E_q[log p(x|z)], estimated with `n_samples` reparameterised draws z = mu + sigma*eps
  (`q.rsample`), summed over pixels, averaged over the draws;
- rate = KL(q(z|x) || p(z)), the model's `rate`: torch's KL registry where the pair is registered
  (closed form for a Gaussian posterior and prior), else the Monte-Carlo estimate
  log q(z|x) - log p(z) on the same draws (mixture priors);
- loss = distortion + beta * rate, averaged over the batch. beta scales the rate against this
  nats-per-example scale: beta=1 is the true bound, beta>1 the beta-VAE of Higgins et al. (2017).

`elbo` is always reported with beta=1, so runs of different beta compare on one scale, whatever
the objective: ELBO (with KL schedules and free bits), IWAE, or the plain Autoencoder (which has
no ELBO and reports its distortion only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.errors import require, require_betas, require_int, require_number
from vaelab.models import LatentVariableModel
from vaelab.models.base import stopped
from vaelab.nets.encoders import check_sizes, mlp

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


class ELBO:
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

    def __call__(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        """Per-example parts (each shape (B,)) and the batch-mean `loss` to minimise.

        x is the encoder's input; target (default x) is what the likelihood scores (they differ
        for a denoising autoencoder). step drives the KL schedule (None: the target beta).
        """
        target = x if target is None else target
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
        return dict(
            loss=loss,
            elbo=-(distortion + rate),
            rate=rate,
            distortion=distortion,
            beta=torch.as_tensor(beta, dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return (
            f"ELBO(beta={self.beta}, n_samples={self.n_samples}, free_bits={self.free_bits}, "
            f"estimator={self.estimator!r})"
        )


class IWAE:
    """Importance-weighted autoencoder bound (Burda et al. 2015) as the training objective.

    loss = -L_k = -log (1/k) sum_i p(x, z_i) / q(z_i|x) with k reparameterised draws, so the
    gradient flows through every sample, weighted by its normalised importance weight. With k=1
    it is the single-sample ELBO with a Monte-Carlo KL. Also reports the ELBO (the model's rate,
    beta=1, from the same draws' likelihoods) and `iwae` = L_k, per example.

    `estimator=dreg` (doubly reparameterised, Tucker et al. 2018): the same bound, differentiated
    so that q(z|x)'s parameters get sum_i w_i^2 d log w_i / d z_i dz_i/dphi (w the normalised
    weights, log w computed with q's parameters cut from the graph) and the model's parameters
    the standard sum_i w_i grad log w_i. The score-function terms it drops have zero expectation;
    the inference network's gradient no longer loses its signal-to-noise ratio as k grows
    (Rainforth et al. 2018). Implemented as a surrogate with the bound's value and a hook on the
    codes that multiplies the gradient reaching z_i by w_i, so the decoder runs once.
    """

    def __init__(self, k: int = 50, estimator: str = "standard") -> None:
        require(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1,
            f"objective.k must be an integer >= 1, got {k}",
        )
        check_estimator(estimator)
        self.k = k
        self.estimator = estimator

    def __call__(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        target = x if target is None else target
        q = model.posterior(x)
        prior = model.prior()
        z = q.rsample((self.k,))  # (k, B, ...)
        log_px = model.log_likelihood(target, z)  # (k, B)
        log_ratio = q.log_prob(z) - prior.log_prob(z)  # (k, B)
        log_w = log_px - log_ratio
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)  # (B,)
        distortion = -log_px.mean(0)
        rate = model.rate(q, prior, z, log_ratio)
        loss = -bound.mean()
        if self.estimator == "dreg":
            path_log_w = log_px + prior.log_prob(z) - stopped(q).log_prob(z)  # same values
            weights = torch.softmax(path_log_w.detach(), dim=0)  # (k, B), normalised over k
            scale_code_gradients(z, weights)  # w_i once more on the path into q's parameters
            surrogate = -(weights * path_log_w).sum(0).mean()
            loss = loss.detach() + surrogate - surrogate.detach()
        return dict(
            loss=loss,
            elbo=-(distortion + rate),
            rate=rate,
            distortion=distortion,
            iwae=bound.detach(),
        )

    def __repr__(self) -> str:
        return f"IWAE(k={self.k}, estimator={self.estimator!r})"


class Autoencoder:
    """The deterministic autoencoder baseline: the posterior mean is the code, no sampling, no
    KL. loss = -log p(x|z) (`reconstruction: likelihood`) or the squared error of p(x|z)'s mean
    summed over pixels (`reconstruction: mse`). There is no ELBO and no likelihood estimate: its
    latent space is not fitted to a prior, which is why decoding z ~ p(z) gives poor samples.
    """

    RECONSTRUCTIONS = ("likelihood", "mse")
    #: evaluate.py reports no importance-sampled log-likelihood for this objective.
    probabilistic = False

    def __init__(self, reconstruction: str = "likelihood") -> None:
        require(
            reconstruction in self.RECONSTRUCTIONS,
            f"objective.reconstruction must be one of {', '.join(self.RECONSTRUCTIONS)}, "
            f"got {reconstruction!r}",
        )
        self.reconstruction = reconstruction

    def __call__(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        target = x if target is None else target
        p = model.decode(model.posterior(x).mean)
        distortion = -p.log_prob(target)  # (B,)
        squared_error = (p.mean - target).pow(2).flatten(1).sum(-1)  # (B,)
        loss = distortion if self.reconstruction == "likelihood" else squared_error
        return dict(loss=loss.mean(), distortion=distortion, squared_error=squared_error)

    def __repr__(self) -> str:
        return f"Autoencoder(reconstruction={self.reconstruction!r})"


class VQ:
    """The VQ-VAE objective (van den Oord et al. 2017, eq. 3), per example:

        loss = -log p(x | z_q) + beta ||z_e - sg(z_q)||^2 [+ ||sg(z_e) - z_q||^2] - log p(k(x))

    with straight-through gradients from z_q to the encoder; the codebook term only when the
    model's codebook is trained by its loss (`model.codebook=loss`; EMA updates otherwise). The
    last term is the code prior's negative log-likelihood of the code grid: h w log K for the
    uniform prior (no gradient), the PixelCNN's NLL when it is learned (which is how the second
    stage trains it). Reports `elbo` = log p(x | z_q) + log p(k(x)), the bound of the point-mass
    posterior (so bits/dim), its `rate` and `distortion`, the `commitment` loss, and the batch's
    codebook `perplexity` (K for a uniform use of all codes) and `usage` (fraction used).
    """

    #: the model must be one whose codes this objective trains (model=vqvae)
    trains_codes = True

    def __init__(self, beta: float = 0.25) -> None:
        require_number("objective.beta", beta, 0)
        self.beta = float(beta)

    def check_model(self, model: LatentVariableModel) -> None:
        require(
            hasattr(model, "quantize"),
            f"objective=vq trains a vector-quantised model (model=vqvae), got "
            f"{type(model).__name__}; use objective=elbo or iwae with it",
        )

    def __call__(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        self.check_model(model)
        target = x if target is None else target
        codes = model.quantize(x)
        distortion = -model.decode_vectors(codes["z_q"]).log_prob(target)  # (B,)
        rate = -model.prior().log_prob(codes["indices"])  # (B,)
        loss = distortion + self.beta * codes["commitment"] + rate
        if model.quantizer.codebook == "loss":
            loss = loss + codes["codebook_loss"]
        return dict(
            loss=loss.mean(),
            elbo=-(distortion + rate),
            rate=rate,
            distortion=distortion,
            commitment=codes["commitment"],
            perplexity=codes["perplexity"],
            usage=codes["usage"],
        )

    def __repr__(self) -> str:
        return f"VQ(beta={self.beta})"


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
        z = q.sample((min(chunk, k - start),))  # (n, B, ...)
        log_w = weights_fn(x, z, q, p)  # (n, B)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
        weight_sum += log_w.sum(0)
    return dict(log_likelihood=log_sum - math.log(k), elbo=weight_sum / k)


def one_draw(
    model: LatentVariableModel, x: Tensor, target: Tensor, owner: str
) -> tuple[Distribution, Distribution, Tensor, Tensor, Tensor]:
    """q(z|x), p(z), one draw z ~ q (B, D), its distortion and the rate (B,) each: what the
    objectives that add a term to the one-draw ELBO share (beta-TCVAE, FactorVAE); `owner`
    names the objective if the posterior is not a diagonal Gaussian over one vector."""
    q = model.posterior(x)
    factorised_gaussian(q, owner)
    prior = model.prior()
    z = q.rsample()
    return q, prior, z, -model.log_likelihood(target, z), model.rate(q, prior, z[None])


def factorised_gaussian(q: Distribution, owner: str) -> torch.distributions.Normal:
    """The per-dimension Normal of a diagonal Gaussian posterior over one flat latent vector."""
    base = q.base_dist if isinstance(q, torch.distributions.Independent) else None
    require(
        isinstance(base, torch.distributions.Normal) and q.reinterpreted_batch_ndims == 1,
        f"{owner} needs a diagonal Gaussian posterior over one latent vector (model=mlp, conv, "
        f"resnet), got {type(q).__name__}",
    )
    return base


class BetaTCVAE(torch.nn.Module):
    """beta-TCVAE (Chen et al. 2018): the ELBO's rate split into three terms, per example,

        E[log q(z|x) - log p(z)] = MI (index-code mutual information, log q(z|x) - log q(z))
                                 + TC (total correlation, log q(z) - sum_d log q(z_d))
                                 + dim-KL (sum_d log q(z_d) - log p(z)),

    loss = distortion + alpha MI + beta TC + gamma dim-KL, on one draw z ~ q(z|x) per example.
    The aggregate posterior q(z) = (1/N) sum_n q(z|x_n) over the N training images and its
    marginals q(z_d) are estimated from the minibatch of M (`sampling`):

    - `mss` (default; minibatch stratified sampling): q(z_i) ~ q(z_i|x_i)/N + (N-1)/(N(M-1))
      sum_{j != i} q(z_i|x_j), an unbiased estimate of q(z_i) for any M >= 2 whose value is exact
      when the batch is the whole dataset. (The weight matrix of Chen et al.'s released code is
      reported to put some weights on the wrong entries: rtqichen/beta-tcvae pull request 1.)
    - `mws` (minibatch weighted sampling, Chen et al.'s eq.): q(z_i) ~ 1/(NM) sum_j q(z_i|x_j),
      whose log is offset from log q(z_i) by about -log N (with the whole dataset as the batch:
      exactly), so its logged TC is offset by (D-1) log N; it also weighs the example's own
      posterior less (1/(NM) against mss's 1/N), which changes the gradients somewhat.

    N is `dataset_size`, from the data side (the DataModule's training split, set when training
    starts, saved in the checkpoint as a buffer). With alpha = beta = gamma = 1 the loss is the
    negative ELBO with a one-draw Monte-Carlo rate. `elbo`, `rate` (closed form where torch has
    it) and `distortion` are reported as for every objective, and `mi`, `tc`, `dim_kl` per example.
    """

    SAMPLINGS = ("mss", "mws")

    def __init__(
        self,
        beta: float = 6.0,
        alpha: float = 1.0,
        gamma: float = 1.0,
        sampling: str = "mss",
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("beta", beta), ("alpha", alpha), ("gamma", gamma)):
            require_number(f"objective.{name}", value, 0)
        require(
            sampling in self.SAMPLINGS,
            f"objective.sampling must be one of {', '.join(self.SAMPLINGS)}, got {sampling!r}",
        )
        if dataset_size is not None:
            require_int("objective.dataset_size", dataset_size, 2)
        self.beta, self.alpha, self.gamma = float(beta), float(alpha), float(gamma)
        self.sampling = sampling
        self.register_buffer("dataset_size", torch.tensor(dataset_size or 0, dtype=torch.long))

    def uses_dataset_size(self, n: int) -> None:
        """The number of training images N (the caller's data; kept if set in the config)."""
        if int(self.dataset_size) == 0:
            require_int("the training split's size (beta_tcvae's N)", n, 2)
            self.dataset_size.fill_(n)

    def log_weights(self, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(M, M) log-weights of q(z_i|x_j) in the estimate of q(z_i)."""
        n = int(self.dataset_size)
        require(
            n >= m,
            f"objective=beta_tcvae: dataset_size={n} is smaller than the batch ({m}); set "
            "objective.dataset_size to the number of training images, or leave it null",
        )
        if self.sampling == "mws":
            return torch.full((m, m), -math.log(n * m), device=device, dtype=dtype)
        require(m >= 2, "objective=beta_tcvae with sampling=mss needs batches of 2 or more")
        weights = torch.full((m, m), (n - 1) / (n * (m - 1)), device=device, dtype=dtype)
        weights.fill_diagonal_(1 / n)
        return weights.log()

    def decomposition(self, q: Distribution, prior: Distribution, z: Tensor) -> dict[str, Tensor]:
        """log q(z|x), log q(z), sum_d log q(z_d), log p(z) of one draw z (M, D) per example,
        each (M,), with q(z) and its marginals estimated over the batch."""
        base = factorised_gaussian(q, "objective=beta_tcvae")
        # log q(z_i,d | x_j): (M_i, M_j, D)
        per_dim = base.log_prob(z[:, None, :])
        log_w = self.log_weights(len(z), z.device, per_dim.dtype)
        return dict(
            log_qzx=per_dim.diagonal(dim1=0, dim2=1).sum(0),
            log_qz=torch.logsumexp(log_w + per_dim.sum(-1), dim=1),
            log_prod_qzd=torch.logsumexp(log_w[..., None] + per_dim, dim=1).sum(-1),
            log_pz=prior.log_prob(z),
        )

    def forward(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        require(
            int(self.dataset_size) > 0,
            "objective=beta_tcvae: the number of training images is not known yet (set "
            "objective.dataset_size, or train through train.py, which sets it from the data)",
        )
        target = x if target is None else target
        q, prior, z, distortion, rate = one_draw(model, x, target, "objective=beta_tcvae")
        terms = self.decomposition(q, prior, z)
        mi = terms["log_qzx"] - terms["log_qz"]
        tc = terms["log_qz"] - terms["log_prod_qzd"]
        dim_kl = terms["log_prod_qzd"] - terms["log_pz"]
        loss = distortion + self.alpha * mi + self.beta * tc + self.gamma * dim_kl
        return dict(
            loss=loss.mean(),
            elbo=-(distortion + rate),
            rate=rate,
            distortion=distortion,
            mi=mi.detach(),
            tc=tc.detach(),
            dim_kl=dim_kl.detach(),
        )

    def __repr__(self) -> str:
        return (
            f"BetaTCVAE(beta={self.beta}, alpha={self.alpha}, gamma={self.gamma}, "
            f"sampling={self.sampling!r}, dataset_size={int(self.dataset_size)})"
        )


def permute_dims(z: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each latent dimension of a batch (M, D) shuffled across the batch independently (Kim &
    Mnih 2018, Alg. 2): samples of the product of the marginals q(z_1) ... q(z_D)."""
    m, d = z.shape
    order = torch.argsort(torch.rand(m, d, device=z.device, generator=generator), dim=0)
    return z.gather(0, order)


class FactorVAE(torch.nn.Module):
    """FactorVAE (Kim & Mnih 2018): the ELBO plus gamma times the total correlation of q(z),
    estimated by a discriminator D that tells codes z ~ q(z) from codes with each dimension
    shuffled across the batch (`permute_dims`): TC ~ E[log D(z) / (1 - D(z))], D's logit.

    loss = distortion + rate + gamma * logit(z)    (the model's parameters; D held fixed)
         + BCE(D(z), 1) + BCE(D(permuted z), 0)   (D's parameters; the codes held fixed)

    Both are minimised in the same optimizer step on the same batch, as disentanglement_lib does
    (Kim & Mnih alternate the two updates on two batches); the discriminator is this objective's
    own module (an MLP of `hidden_dims` with leaky ReLUs, 6 x 1000 in the paper), built for the
    model's latent size, saved in the checkpoint, and trained with its own Adam settings (`lr`,
    `betas`; 1e-4 and (0.5, 0.9) in the paper) as its own parameter group. A learning-rate
    schedule scales both groups. Reports `tc` (the discriminator's estimate, nats),
    `discriminator_loss` and `discriminator_accuracy` next to the ELBO's parts.
    """

    def __init__(
        self,
        gamma: float = 10.0,
        hidden_dims: tuple[int, ...] | list[int] = (1000,) * 6,
        lr: float = 1e-4,
        betas: tuple[float, float] | list[float] = (0.5, 0.9),
        latent_dim: int | None = None,
    ) -> None:
        super().__init__()
        require_number("objective.gamma", gamma, 0)
        require_number("objective.lr", lr, 0)
        hidden = check_sizes("objective.hidden_dims", hidden_dims)
        require_betas("objective.betas", betas)
        self.gamma, self.lr, self.betas, self.hidden_dims = float(gamma), lr, tuple(betas), hidden
        self.discriminator: torch.nn.Module | None = None
        if latent_dim is not None:
            self.build(latent_dim)

    def build(self, latent_dim: int) -> None:
        leaky = functools.partial(torch.nn.LeakyReLU, 0.2)
        self.discriminator = mlp([latent_dim, *self.hidden_dims, 1], leaky)

    def check_model(self, model: LatentVariableModel) -> None:
        """Build the discriminator for the model's latent vector (build.py calls this)."""
        require(
            model.latent_dim is not None and not model.conditional,
            f"objective=factorvae needs one flat latent vector (model=mlp, conv, resnet), got "
            f"{type(model).__name__}",
        )
        if self.discriminator is None:
            self.build(model.latent_dim)

    def param_groups(self) -> list[dict]:
        """The discriminator's parameters with its own optimizer settings."""
        require(self.discriminator is not None, "objective=factorvae: no model bound yet")
        return [dict(params=list(self.discriminator.parameters()), lr=self.lr, betas=self.betas)]

    def forward(
        self,
        model: LatentVariableModel,
        x: Tensor,
        target: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        self.check_model(model)
        target = x if target is None else target
        _, _, z, distortion, rate = one_draw(model, x, target, "objective=factorvae")
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        tc = torch.func.functional_call(self.discriminator, frozen, (z,)).squeeze(-1)
        codes = z.detach()
        real = self.discriminator(codes).squeeze(-1)
        shuffled = self.discriminator(permute_dims(codes)).squeeze(-1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        d_loss = 0.5 * (bce(real, torch.ones_like(real)) + bce(shuffled, torch.zeros_like(real)))
        accuracy = 0.5 * ((real > 0).float().mean() + (shuffled < 0).float().mean())
        loss = (distortion + rate + self.gamma * tc).mean() + d_loss
        return dict(
            loss=loss,
            elbo=-(distortion + rate),
            rate=rate,
            distortion=distortion,
            tc=tc.detach(),
            discriminator_loss=d_loss.detach(),
            discriminator_accuracy=accuracy.detach(),
        )

    def __repr__(self) -> str:
        return (
            f"FactorVAE(gamma={self.gamma}, hidden_dims={self.hidden_dims}, lr={self.lr}, "
            f"betas={self.betas})"
        )
