"""One pass over a split: importance-sampled log-likelihood and posterior diagnostics.

- nll_is: -L_k, the importance-sampled estimate of -log p(x) with the posterior as proposal
  (Burda et al. 2015; k=5000 is the standard test-set protocol), nats per example.
- bpd: nll_is in bits per dimension, with the DataModule's pixel model (binary, or dequantised
  8-bit data with the ln 256 bin width).
- kl_per_dim: KL(q(z_d|x) || p(z_d)) averaged over the split, per latent dimension.
- active_units: dimensions d with Cov_x(E_q[z_d]) > 0.01 (Burda et al. 2015).
- mse: mean squared error of the reconstruction (mean of p(x|z) at z = E_q[z]) on [0, 1] pixels,
  against the clean image (noisy -> clean for a denoising model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.distributions import kl_divergence
from torch.utils.data import DataLoader

from vaelab.data import MNISTFamilyDataModule
from vaelab.objectives import iwae_bound
from vaelab.vae import VAE

ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass
class SplitResults:
    """Per-example quantities of a split, gathered on the CPU."""

    log_likelihood: list[Tensor] = field(default_factory=list)  # L_k, (B,) each
    elbo_is: list[Tensor] = field(default_factory=list)  # mean log-weight, (B,) each
    kl_per_dim: list[Tensor] = field(default_factory=list)  # (B, latent_dim) each
    posterior_mean: list[Tensor] = field(default_factory=list)  # (B, latent_dim) each
    labels: list[Tensor] = field(default_factory=list)
    squared_error: list[Tensor] = field(default_factory=list)  # (B,) mean over pixels
    examples: list[Tensor] = field(default_factory=list)  # the first `keep` clean images
    example_inputs: list[Tensor] = field(default_factory=list)  # and the encoder's view of them

    def cat(self, name: str) -> Tensor:
        return torch.cat(getattr(self, name))


@torch.no_grad()
def evaluate_split(
    vae: VAE,
    loader: DataLoader,
    datamodule: MNISTFamilyDataModule,
    k: int,
    max_codes: int,
    device: torch.device,
    limit: int | None = None,
    keep: int = 2000,
    probabilistic: bool = True,
) -> SplitResults:
    """Run every batch (or the first `limit` examples) through the IS estimator and
    diagnostics. Inputs are the encoder's view (corrupted for a denoising model); likelihoods and
    errors are scored on the clean images. `probabilistic=False` (a plain autoencoder): no
    likelihood and no KL, which are undefined for it."""
    results = SplitResults()
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            break
        inputs, x, labels = datamodule.fetch(move_data_to_device(batch, device))
        if limit is not None:
            inputs, x, labels = inputs[: limit - seen], x[: limit - seen], labels[: limit - seen]
        seen += len(x)
        kept = sum(len(e) for e in results.examples)
        if kept < keep:
            results.examples.append(x[: keep - kept].cpu())
            results.example_inputs.append(inputs[: keep - kept].cpu())
        q = vae.posterior(inputs)
        if probabilistic:
            bound = iwae_bound(vae, x, k, max_codes=max_codes, inputs=inputs)
            kl = kl_divergence(q.base_dist, vae.prior().base_dist)  # (B, latent_dim)
            results.log_likelihood.append(bound["log_likelihood"].cpu())
            results.elbo_is.append(bound["elbo"].cpu())
            results.kl_per_dim.append(kl.cpu())
        reconstruction = vae.decode(q.mean).mean
        results.posterior_mean.append(q.mean.cpu())
        results.labels.append(labels.cpu())
        results.squared_error.append((reconstruction - x).pow(2).flatten(1).mean(1).cpu())
    return results


def summarise(
    results: SplitResults, split: str, num_dims: int, bpd_offset: float | None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scalar metrics (`{split}/...`) and per-dimension lists for the report."""
    mean_variance = results.cat("posterior_mean").double().var(0, unbiased=False)
    metrics = {
        f"{split}/active_units": float((mean_variance > ACTIVE_UNIT_THRESHOLD).sum()),
        f"{split}/mse": results.cat("squared_error").double().mean().item(),
    }
    per_dim: dict[str, list] = {"posterior_mean_variance": mean_variance.tolist()}
    if not results.log_likelihood:  # a deterministic autoencoder: no likelihood, no KL
        per_dim["kl_dim_order"] = torch.argsort(mean_variance, descending=True).tolist()
        return metrics, per_dim
    nll = -results.cat("log_likelihood").double()
    metrics[f"{split}/nll_is"] = nll.mean().item()
    metrics[f"{split}/nll_is_sem"] = (
        (nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else 0.0
    )
    metrics[f"{split}/elbo_is"] = results.cat("elbo_is").double().mean().item()
    if bpd_offset is not None:
        metrics[f"{split}/bpd"] = (metrics[f"{split}/nll_is"] / num_dims + bpd_offset) / math.log(2)
    kl_per_dim = results.cat("kl_per_dim").double().mean(0)
    order = torch.argsort(kl_per_dim, descending=True)
    per_dim["kl_per_dim_sorted"] = kl_per_dim[order].tolist()
    per_dim["kl_dim_order"] = order.tolist()
    return metrics, per_dim
