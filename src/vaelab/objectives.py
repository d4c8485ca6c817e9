"""Training objectives with named parts, in nats per example.

ELBO (Kingma & Welling 2013):  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x).

- distortion = -E_q[log p(x|z)], estimated with `n_samples` reparameterised draws z = mu + sigma*eps
  (`q.rsample`), summed over pixels, averaged over the draws;
- rate = KL(q(z|x) || p(z)), from torch's KL registry (closed form for Gaussians), summed over
  latent dimensions;
- loss = distortion + beta * rate, averaged over the batch. beta scales the rate against this
  nats-per-example scale: beta=1 is the true bound, beta>1 the beta-VAE of Higgins et al. (2017).

`elbo` is always reported with beta=1, so runs of different beta compare on one scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from vaelab.errors import require
from vaelab.vae import VAE


class ELBO:
    """Negative (beta-weighted) evidence lower bound with L = `n_samples` Monte-Carlo samples."""

    def __init__(self, beta: float = 1.0, n_samples: int = 1) -> None:
        require(beta >= 0, f"objective.beta must be >= 0, got {beta}")
        require(
            isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1,
            f"objective.n_samples must be an integer >= 1, got {n_samples}",
        )
        self.beta = float(beta)
        self.n_samples = n_samples

    def __call__(self, vae: VAE, x: Tensor) -> dict[str, Tensor]:
        """Per-example parts (each shape (B,)) and the batch-mean `loss` to minimise."""
        q = vae.posterior(x)  # batch (B,), event (latent_dim,)
        z = q.rsample((self.n_samples,))  # (L, B, latent_dim)
        distortion = -vae.decode(z).log_prob(x).mean(0)  # (B,)
        rate = kl_divergence(q, vae.prior())  # (B,)
        loss = (distortion + self.beta * rate).mean()
        return dict(loss=loss, elbo=-(distortion + rate), rate=rate, distortion=distortion)

    def __repr__(self) -> str:
        return f"ELBO(beta={self.beta}, n_samples={self.n_samples})"


def log_importance_weights(vae: VAE, x: Tensor, q: Distribution, n: int) -> Tensor:
    """log w_i = log p(x, z_i) - log q(z_i|x) for n draws z_i ~ q(z|x): shape (n, B)."""
    z = q.sample((n,))  # (n, B, latent_dim)
    return vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)


@torch.no_grad()
def iwae_bound(vae: VAE, x: Tensor, k: int, max_codes: int = 5000) -> dict[str, Tensor]:
    """Importance-weighted bound L_k (Burda et al. 2015) per example, and the ELBO from the same
    weights.

    L_k = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): a lower bound on log p(x) that
    increases with k (L_1 = ELBO); -L_k at k=5000 is the standard estimate of -log p(x). The k
    samples are drawn in chunks of at most `max_codes` codes per decoder call (chunk of samples
    times batch size), combined with a running log-sum-exp, so memory stays bounded for any k.
    Returns `log_likelihood` (L_k) and `elbo` (the mean log-weight, a Monte-Carlo ELBO), each (B,).
    """
    require(isinstance(k, int) and k >= 1, f"eval.k must be an integer >= 1, got {k!r}")
    q = vae.posterior(x)
    chunk = max(1, min(k, max_codes // len(x)))
    log_sum = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
    weight_sum = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    for start in range(0, k, chunk):
        log_w = log_importance_weights(vae, x, q, min(chunk, k - start))  # (n, B)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
        weight_sum += log_w.sum(0)
    return dict(log_likelihood=log_sum - math.log(k), elbo=weight_sum / k)
