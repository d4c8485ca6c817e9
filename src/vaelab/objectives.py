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

from torch import Tensor
from torch.distributions import kl_divergence

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
