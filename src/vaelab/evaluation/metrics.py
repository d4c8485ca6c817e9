"""One pass over a split: importance-sampled log-likelihood and posterior diagnostics.

- nll_is: -L_k, the importance-sampled estimate of -log p(x) with the posterior as proposal
  (Burda et al. 2015; k=5000 is the standard test-set protocol), nats per example.
- bpd: nll_is in bits per dimension, as the likelihood defines it for the data's pixel model
  (binary pixels; dequantised 8-bit data with the ln 256 bin width).
- kl_per_dim: KL(q(z_d|x) || p(z_d)) averaged over the split, per latent dimension, where the
  posterior and prior factorise over the dimensions (not for a mixture prior).
- active_units: dimensions d with Cov_x(E_q[z_d]) > 0.01 (Burda et al. 2015), on the model's
  representation (the posterior mean).
- mse: mean squared error of the reconstruction (mean of p(x|z) at z = E_q[z]) on [0, 1] pixels,
  against the clean image (noisy -> clean for a denoising model).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.distributions import Distribution
from torch.utils.data import DataLoader
from tqdm import tqdm

from vaelab.compiled import Compiled, cpu_options
from vaelab.data import ImageDataModule
from vaelab.errors import require
from vaelab.models import LatentVariableModel
from vaelab.objectives import LogWeightsFn, iwae_bound
from vaelab.objectives.bounds import diagonal_gaussian

log = logging.getLogger(__name__)
ACTIVE_UNIT_THRESHOLD = 0.01
COMPILE_CHOICES = ("auto", True, False)
#: eval.compile=auto compiles on a CPU when the split needs at least this many decoded codes (k
#: times examples), where the time saved outweighs the compilation's (benchmarks/nll_is.py
#: measures both). A GPU decodes that many codes quickly, so `auto` does not compile there.
COMPILE_AUTO_MIN_CODES = 1_000_000
#: eval.max_codes=auto (codes decoded per call of the IS pass): on a CPU 5000, where larger
#: chunks only leave the caches; on a GPU as many as fill a fifth of the free memory at
#: `bytes_per_code` each (the test set's k=5000 pass in a few hundred calls, not ten thousand),
#: never fewer than the CPU's, halved again if the device still runs out of memory.
CPU_MAX_CODES = 5000
GPU_MEMORY_FRACTION = 0.2
MAX_CODES_CEILING = 1 << 22


def bytes_per_code(model: LatentVariableModel) -> int:
    """An estimate of the device memory one decoded code takes in the IS pass: 16 float32
    numbers per pixel value (the decoder's output, a mixture likelihood's parameters, the
    log-density's temporaries) and 4 per latent number."""
    latent = sum(math.prod(shape) for shape in model.latent_parts.values())
    return 4 * (16 * math.prod(model.image_shape) + 4 * latent)


def resolve_max_codes(
    max_codes: int | str,
    model: LatentVariableModel,
    device: torch.device,
    free_bytes: int | None = None,
) -> int:
    """eval.max_codes: an integer as given; `auto` as described at CPU_MAX_CODES (`free_bytes`:
    the device's free memory, read from it when None)."""
    if max_codes != "auto":
        return int(max_codes)
    if device.type != "cuda":
        return CPU_MAX_CODES
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    codes = int(GPU_MEMORY_FRACTION * free_bytes / bytes_per_code(model))
    return max(CPU_MAX_CODES, min(MAX_CODES_CEILING, codes))


#: On a CPU, the compiled IS pass decodes each chunk's codes in groups of about this many (some
#: of the chunk's examples with all their samples), each group scored before the next is decoded:
#: a group's decoder output (3 MB for 784 pixels) is still in the CPU's caches when the likelihood
#: reads it, where a whole chunk's (16 MB) goes to memory and back (benchmarks/nll_is.py).
CPU_TILE_CODES = 1024


def examples_per_group(samples: int, tile_codes: int = CPU_TILE_CODES) -> int:
    """How many examples (each with `samples` codes) make a group of about `tile_codes` codes."""
    return max(1, tile_codes // samples)


class CompiledLogWeights:
    """A model's `log_weights` through torch.compile (`eval.compile`, vaelab.compiled): log p(x|z)
    (`model.log_likelihood`: the decoder and the likelihood's log-density, the bulk of the work)
    and, where both are diagonal Gaussians, log p(z) - log q(z|x); other priors and posteriors
    (mixtures, flows) add their log-densities eagerly, so any prior works. The decoder's matrix
    products stay library calls and everything between and after them becomes a few fused loops.
    On a CPU the examples are decoded in groups of about CPU_TILE_CODES codes inside the one
    compiled call (`grouped_log_likelihood`). benchmarks/nll_is.py has the figures."""

    def __init__(self, model: LatentVariableModel, device: torch.device) -> None:
        self.model = model
        self.tile_codes = CPU_TILE_CODES if device.type == "cpu" else None
        # (no cpp_wrapper: one call per chunk of thousands of codes leaves nothing to gain)
        options = cpu_options("cpp.use_decompose_tanh") if device.type == "cpu" else {}
        self.log_likelihood = Compiled(
            self.grouped_log_likelihood, "eval.compile", options, "evaluating eagerly"
        )
        self.gaussian_log_weights = Compiled(
            self.grouped_log_weights, "eval.compile", options, "evaluating eagerly"
        )

    def grouped_log_likelihood(self, x: Tensor, z: Tensor) -> list[Tensor]:
        """log p(x|z) for codes z (n, B, ...), as (n, b) pieces over consecutive groups of the B
        examples. A list: concatenating inside the compiled graph would let the compiler merge
        every group's log-density into one loop after the last decoder call, which reads their
        outputs back from memory. Each example is decoded on its own, so the grouping changes
        the order of the work, not the numbers."""
        if self.tile_codes is None:
            return [self.model.log_likelihood(x, z)]
        per_group = examples_per_group(z.shape[0], self.tile_codes)
        return [
            self.model.log_likelihood(x_group, z_group)
            for x_group, z_group in zip(x.split(per_group), z.split(per_group, dim=1), strict=True)
        ]

    def grouped_log_weights(
        self, x: Tensor, z: Tensor, q: Distribution, p: Distribution
    ) -> tuple[list[Tensor], Tensor]:
        """`grouped_log_likelihood` and log p(z) - log q(z|x), (n, B), in one graph."""
        return self.grouped_log_likelihood(x, z), p.log_prob(z) - q.log_prob(z)

    def __call__(self, x: Tensor, z: Tensor, q: Distribution, p: Distribution) -> Tensor:
        if diagonal_gaussian(q) and diagonal_gaussian(p):
            log_px, log_ratio = self.gaussian_log_weights(x, z, q, p)
            return torch.cat(log_px, dim=1) + log_ratio
        return torch.cat(self.log_likelihood(x, z), dim=1) + p.log_prob(z) - q.log_prob(z)


def check_compile_choice(compile: object) -> None:
    require(
        compile in COMPILE_CHOICES,
        f"eval.compile must be one of auto, true, false, got {compile!r}",
    )


def weights_function(
    model: LatentVariableModel, compile: bool | str, total_codes: int, device: torch.device
) -> LogWeightsFn | None:
    """The log-weight function for `iwae_bound`: compiled (`compile=True`, or `auto` on a CPU
    when `total_codes` is large enough to repay the compilation), else None (eager)."""
    check_compile_choice(compile)
    worth_it = device.type == "cpu" and total_codes >= COMPILE_AUTO_MIN_CODES
    if compile is True or (compile == "auto" and worth_it):
        return CompiledLogWeights(model, device)
    return None


@dataclass
class SplitResults:
    """Per-example quantities of a split, gathered on the CPU."""

    log_likelihood: list[Tensor] = field(default_factory=list)  # L_k, (B,) each
    elbo_is: list[Tensor] = field(default_factory=list)  # mean log-weight, (B,) each
    kl_per_dim: list[Tensor] = field(default_factory=list)  # (B, D) each, where defined
    posterior_mean: list[Tensor] = field(default_factory=list)  # (B, D) each
    labels: list[Tensor] = field(default_factory=list)
    squared_error: list[Tensor] = field(default_factory=list)  # (B,) mean over pixels
    examples: list[Tensor] = field(default_factory=list)  # the first `keep` clean images
    example_inputs: list[Tensor] = field(default_factory=list)  # and the encoder's view of them
    max_codes: int | None = None  # codes per decoder call that the pass used

    def cat(self, name: str) -> Tensor:
        return torch.cat(getattr(self, name))


@torch.no_grad()
def evaluate_split(
    model: LatentVariableModel,
    loader: DataLoader,
    datamodule: ImageDataModule,
    k: int,
    max_codes: int | str,
    device: torch.device,
    limit: int | None = None,
    keep: int = 2000,
    probabilistic: bool = True,
    compile: bool | str = "auto",
    progress: str | None = None,
) -> SplitResults:
    """Run every batch (or the first `limit` examples) through the IS estimator and
    diagnostics. Inputs are the encoder's view (corrupted for a denoising model); likelihoods and
    errors are scored on the clean images. `probabilistic=False` (a plain autoencoder): no
    likelihood and no KL, which are undefined for it. `compile`: see `weights_function`.
    `progress`: the label of a progress bar over the examples (on stderr, with the running NLL
    estimate and the time left); None: no bar."""
    results = SplitResults()
    auto = max_codes == "auto"
    max_codes = resolve_max_codes(max_codes, model, device)
    results.max_codes = max_codes
    examples = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    weights_fn = None
    if probabilistic and not model.conditional:  # (a compiled decoder would not see the labels)
        weights_fn = weights_function(model, compile, k * examples, device)
    prior = model.prior() if probabilistic and not model.conditional else None  # the same for all
    bar = tqdm(total=examples, desc=progress, unit="img", disable=progress is None, leave=True)
    nll_sum = 0.0
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
        given = model.given(labels)  # log p(x|y) for a conditional model
        q = given.posterior(inputs)
        if probabilistic:
            p = given.prior() if prior is None else prior
            while True:
                try:
                    bound = iwae_bound(
                        given, x, k, max_codes, inputs=inputs, weights_fn=weights_fn, prior=p
                    )
                    break
                except torch.cuda.OutOfMemoryError:
                    if not auto or max_codes <= CPU_MAX_CODES:
                        raise
                    max_codes = max(CPU_MAX_CODES, max_codes // 2)
                    results.max_codes = max_codes
                    torch.cuda.empty_cache()
                    log.warning("eval.max_codes=auto: out of memory; %d codes per call", max_codes)
            results.log_likelihood.append(bound["log_likelihood"].cpu())
            results.elbo_is.append(bound["elbo"].cpu())
            nll_sum -= float(results.log_likelihood[-1].double().sum())
            bar.set_postfix_str(f"nll_is={nll_sum / seen:.2f}", refresh=False)
            kl = given.rate_per_dim(q, p)  # (B, D), or None for a mixture prior
            if kl is not None:
                results.kl_per_dim.append(kl.cpu())
        reconstruction = given.decode(q.mean).mean
        results.posterior_mean.append(given.representation(q).cpu())
        results.labels.append(labels.cpu())
        results.squared_error.append((reconstruction - x).pow(2).flatten(1).mean(1).cpu())
        bar.update(len(x))
    bar.close()
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
    if not results.kl_per_dim:  # no per-dimension KL (a mixture prior): order by activity
        per_dim["kl_dim_order"] = torch.argsort(mean_variance, descending=True).tolist()
        return metrics, per_dim
    kl_per_dim = results.cat("kl_per_dim").double().mean(0)
    order = torch.argsort(kl_per_dim, descending=True)
    per_dim["kl_per_dim_sorted"] = kl_per_dim[order].tolist()
    per_dim["kl_dim_order"] = order.tolist()
    return metrics, per_dim
