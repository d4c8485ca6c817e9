"""Objectives that add a term against the total correlation of q(z) to the one-draw ELBO:
beta-TCVAE (Chen et al. 2018) and FactorVAE (Kim & Mnih 2018)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.errors import require, require_betas, require_int, require_number
from vaelab.models import LatentVariableModel
from vaelab.nets.encoders import check_sizes, mlp
from vaelab.objectives.base import KLSchedule, Objective, bound_parts


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


class BetaTCVAE(Objective, torch.nn.Module):
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

    N is `dataset_size`, from the data side (the DataModule's training split, given by `setup`
    when training starts, saved in the checkpoint as a buffer). With alpha = beta = gamma = 1
    the loss is the negative ELBO with a one-draw Monte-Carlo rate. `elbo`, `rate` (closed form
    where torch has it) and `distortion` are reported as for every objective, and `mi`, `tc`,
    `dim_kl` per example.
    """

    SAMPLINGS = ("mss", "mws")

    def __init__(
        self,
        beta: float = 6.0,
        alpha: float = 1.0,
        gamma: float = 1.0,
        sampling: str = "mss",
        dataset_size: int | None = None,
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
    ) -> None:
        """The KL schedule (as the ELBO's, target 1) ramps the three KL terms together."""
        super().__init__()
        self.warmup = KLSchedule(1.0, kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ratio)
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

    def setup(self, train_size: int) -> None:
        """The number of training images N (the caller's data; kept if set in the config)."""
        n = train_size
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

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        require(
            int(self.dataset_size) > 0,
            "objective=beta_tcvae: the number of training images is not known yet (set "
            "objective.dataset_size, or train through train.py, which sets it from the data)",
        )
        q, prior, z, distortion, rate = one_draw(model, x, target, "objective=beta_tcvae")
        terms = self.decomposition(q, prior, z)
        mi = terms["log_qzx"] - terms["log_qz"]
        tc = terms["log_qz"] - terms["log_prod_qzd"]
        dim_kl = terms["log_prod_qzd"] - terms["log_pz"]
        ramp = self.warmup(step)
        loss = distortion + ramp * (self.alpha * mi + self.beta * tc + self.gamma * dim_kl)
        return bound_parts(
            loss.mean(),
            distortion,
            rate,
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


class FactorVAE(Objective, torch.nn.Module):
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
        kl_schedule: str = "linear",
        kl_warmup_steps: int = 0,
        kl_cycle_steps: int = 10000,
        kl_cycle_ratio: float = 0.5,
    ) -> None:
        """The KL schedule (as the ELBO's, target 1) ramps the KL term, not gamma's TC."""
        super().__init__()
        self.warmup = KLSchedule(1.0, kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ratio)
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
        require(
            model.flat_code_dim is not None,
            f"objective=factorvae needs one flat latent vector (model=mlp, conv, resnet), got "
            f"{type(model).__name__}",
        )

    def bind(self, model: LatentVariableModel) -> None:
        """The discriminator, for the model's latent vector."""
        self.check_model(model)
        if self.discriminator is None:
            self.build(model.flat_code_dim)

    def param_groups(self) -> list[dict]:
        """The discriminator's parameters with its own optimizer settings."""
        require(self.discriminator is not None, "objective=factorvae: no model bound yet")
        return [dict(params=list(self.discriminator.parameters()), lr=self.lr, betas=self.betas)]

    def parts(
        self, model: LatentVariableModel, x: Tensor, target: Tensor, step: int | None
    ) -> dict[str, Tensor]:
        require(self.discriminator is not None, "objective=factorvae: no model bound yet")
        _, _, z, distortion, rate = one_draw(model, x, target, "objective=factorvae")
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        tc = torch.func.functional_call(self.discriminator, frozen, (z,)).squeeze(-1)
        codes = z.detach()
        real = self.discriminator(codes).squeeze(-1)
        shuffled = self.discriminator(permute_dims(codes)).squeeze(-1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        d_loss = 0.5 * (bce(real, torch.ones_like(real)) + bce(shuffled, torch.zeros_like(real)))
        accuracy = 0.5 * ((real > 0).float().mean() + (shuffled < 0).float().mean())
        ramp = self.warmup(step)
        loss = (distortion + ramp * rate + self.gamma * tc).mean() + d_loss
        return bound_parts(
            loss,
            distortion,
            rate,
            tc=tc.detach(),
            discriminator_loss=d_loss.detach(),
            discriminator_accuracy=accuracy.detach(),
        )

    def __repr__(self) -> str:
        return (
            f"FactorVAE(gamma={self.gamma}, hidden_dims={self.hidden_dims}, lr={self.lr}, "
            f"betas={self.betas})"
        )
