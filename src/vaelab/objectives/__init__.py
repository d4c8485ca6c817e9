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

from vaelab.objectives.autoencoders import RAE, VQ, Autoencoder
from vaelab.objectives.base import ESTIMATORS, KLSchedule, Objective
from vaelab.objectives.bounds import ELBO, IWAE, LogWeightsFn, iwae_bound
from vaelab.objectives.disentangling import BetaTCVAE, FactorVAE, permute_dims
from vaelab.objectives.mmd import WAE, InfoVAE, MMDObjective, mmd_unbiased

__all__ = [
    "ELBO",
    "ESTIMATORS",
    "IWAE",
    "RAE",
    "VQ",
    "WAE",
    "Autoencoder",
    "BetaTCVAE",
    "FactorVAE",
    "InfoVAE",
    "KLSchedule",
    "LogWeightsFn",
    "MMDObjective",
    "Objective",
    "iwae_bound",
    "mmd_unbiased",
    "permute_dims",
]
