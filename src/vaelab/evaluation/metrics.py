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

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.distributions import kl_divergence
from torch.utils.data import DataLoader

from vaelab.data import MNISTFamilyDataModule
from vaelab.errors import require
from vaelab.objectives import LogWeightsFn, iwae_bound, log_weights
from vaelab.vae import VAE

log = logging.getLogger(__name__)
ACTIVE_UNIT_THRESHOLD = 0.01
COMPILE_CHOICES = ("auto", True, False)
#: eval.compile=auto compiles on a CPU when the split needs at least this many decoded codes (k
#: times examples): compiling takes a few seconds, decoding a million codes of a small MLP about
#: as long. (A GPU decodes that many in well under a second, so compiling rarely pays there.)
COMPILE_AUTO_MIN_CODES = 1_000_000


def compile_options() -> dict[str, bool]:
    """Inductor options for the compiled weights: tanh as 2 / (1 + exp(-2x)) - 1 on a CPU (1.5x
    faster than the vectorised library tanh here; off by default in torch for a relative error
    near 0 that does not matter for activations: absolute error < 2e-7). Left out where this
    torch has no such option."""
    cpp = getattr(getattr(torch, "_inductor", None), "config", None)
    cpp = getattr(cpp, "cpp", None)
    return {"cpp.use_decompose_tanh": True} if hasattr(cpp, "use_decompose_tanh") else {}


class CompiledLogWeights:
    """`log_weights` of one VAE through `torch.compile`: the decoder's matrix products stay
    library calls, and everything between and after them (activations, the likelihood's
    per-pixel log-probs and their sum, prior and posterior log-densities) becomes a few fused
    loops (the Bernoulli likelihood's grouped sum, `vaelab.likelihoods.bernoulli_log_prob_sum`,
    fuses into one), with the exp-based tanh of `compile_options` (benchmarks/nll_is.py has the
    figures against the eager path and a plain loop). Shapes are static (one compilation per
    chunk shape, usually one). If compiling fails (no C++ compiler on a CPU machine, an
    unsupported module), one warning says so and every call from then on runs eagerly; the
    numbers are the same up to float rounding.
    """

    def __init__(self, vae: VAE) -> None:
        self.eager: LogWeightsFn = functools.partial(log_weights, vae)
        self.fn: LogWeightsFn = torch.compile(self.eager, dynamic=False, options=compile_options())

    def __call__(self, x: Tensor, z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        if self.fn is self.eager:
            return self.eager(x, z, loc, scale)
        try:  # compilation happens on a call: the first, and any with a new chunk shape
            return self.fn(x, z, loc, scale)
        except Exception as e:  # any failure of the compiler stack: fall back, do not stop
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning(
                "eval.compile: torch.compile failed (%s: %s); evaluating eagerly",
                type(e).__name__,
                first_line[:200],
            )
            self.fn = self.eager
            return self.eager(x, z, loc, scale)


def check_compile_choice(compile: object) -> None:
    require(
        compile in COMPILE_CHOICES,
        f"eval.compile must be one of auto, true, false, got {compile!r}",
    )


def weights_function(
    vae: VAE, compile: bool | str, total_codes: int, device: torch.device
) -> LogWeightsFn | None:
    """The log-weight function for `iwae_bound`: compiled (`compile=True`, or `auto` on a CPU
    when `total_codes` is large enough to repay the compilation), else None (eager)."""
    check_compile_choice(compile)
    worth_it = device.type == "cpu" and total_codes >= COMPILE_AUTO_MIN_CODES
    if compile is True or (compile == "auto" and worth_it):
        return CompiledLogWeights(vae)
    return None


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
    compile: bool | str = "auto",
) -> SplitResults:
    """Run every batch (or the first `limit` examples) through the IS estimator and
    diagnostics. Inputs are the encoder's view (corrupted for a denoising model); likelihoods and
    errors are scored on the clean images. `probabilistic=False` (a plain autoencoder): no
    likelihood and no KL, which are undefined for it. `compile`: see `weights_function`."""
    results = SplitResults()
    examples = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    weights_fn = weights_function(vae, compile, k * examples, device) if probabilistic else None
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
            bound = iwae_bound(vae, x, k, max_codes=max_codes, inputs=inputs, weights_fn=weights_fn)
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
