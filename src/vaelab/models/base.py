"""The model protocol: what objectives, evaluation, callbacks and pictures may use of a model.

A latent-variable model p(x, z) = p(x|z) p(z) with an amortised posterior q(z|x) exposes
distributions (torch.distributions objects, one event per example) and a few derived terms:

- `posterior(x)`: q(z|x), batch shape (B,);
- `prior()`: p(z) (it may use the model's own modules: VampPrior's pseudo-inputs go through the
  encoder);
- `decode(z)`: p(x|z) for codes of shape (*S, B, ...), batch shape (*S, B), event (C, H, W);
- `rate(q, p, z, log_ratio=None)`: KL(q || p) per example, from torch's KL registry where the
  pair is registered, else the Monte-Carlo estimate log q(z|x) - log p(z) averaged over the same
  draws z (or over `log_ratio`, when the caller has computed it);
- `log_weights(x, z, q, p)`: log p(x, z) - log q(z|x), the importance weights of IWAE and of the
  importance-sampled log-likelihood;
- `sample(n)`, `reconstruct(x)`, `representation(q)` (the code a picture or a diagnostic uses:
  the posterior mean, (B, D)), `latent_parts` (name -> event shape, one per stochastic
  layer) and `layer_rates(x)` (the rate of each layer, for models with several);
- `given(labels)`: the model given the examples' labels (B,), as an argument: a conditional
  model (`conditional`, model=cvae) returns a view whose distributions are those given the
  labels, any other model itself; `sample_labels(n)` gives labels to sample for;
- `flat_code_dim`: D when the code is one flat vector whose dimensions can be set one by one
  (traversals, the manifold, disentanglement metrics, FactorVAE), else None.

Nothing outside a model assumes one Gaussian latent or a closed-form KL: a new family subclasses
`LatentVariableModel` and overrides what differs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelab.errors import ConfigError, require

#: `model.output_bias` values (`LatentVariableModel.use_output_bias`).
OUTPUT_BIASES = ("none", "data_mean")

#: Kinds of (posterior, prior) pairs whose KL torch's registry (`register_kl`) does not have:
#: found on the first call, so later calls (and compiled graphs) go straight to the estimate.
NO_CLOSED_FORM: set[tuple[tuple[type, ...], tuple[type, ...]]] = set()


def kind(d: Distribution) -> tuple[type, ...]:
    """What KL dispatch looks at: the class, and for `Independent` the base's class too."""
    return (type(d), type(d.base_dist)) if isinstance(d, Independent) else (type(d),)


def rate(q: Distribution, p: Distribution, z: Tensor, log_ratio: Tensor | None = None) -> Tensor:
    """KL(q || p) per example: the registered closed form where torch's KL registry has the pair,
    else mean_s [log q(z_s) - log p(z_s)] over the draws z (S, B, ...), which are the ones the
    rest of the objective uses, so its gradient is the reparameterised one. `log_ratio`:
    log q(z) - log p(z) (S, B), when the caller has it already (IWAE's weights)."""
    pair = (kind(q), kind(p))
    if pair not in NO_CLOSED_FORM:
        try:
            return kl_divergence(q, p)
        except NotImplementedError:
            NO_CLOSED_FORM.add(pair)
    return (q.log_prob(z) - p.log_prob(z) if log_ratio is None else log_ratio).mean(0)


def rate_per_dim(q: Distribution, p: Distribution) -> Tensor | None:
    """KL per latent dimension (B, D) when q and p both factorise over the dimensions of one
    latent vector with a registered KL between their factors (Gaussian posterior and N(0, I) or
    any diagonal Gaussian prior); None otherwise (a mixture prior has no per-dimension KL)."""
    if not (isinstance(q, Independent) and isinstance(p, Independent)):
        return None
    if q.reinterpreted_batch_ndims != 1 or p.reinterpreted_batch_ndims != 1:
        return None
    try:
        return kl_divergence(q.base_dist, p.base_dist)
    except NotImplementedError:
        return None


def stopped(q: Distribution) -> Distribution:
    """q with its parameters cut from the graph: log q_stop(z) still depends on z (the path
    derivative), not on q's parameters directly (the score function, zero in expectation).
    Gaussian posteriors (Normal, in an Independent) are handled here; another family's posterior
    provides `detached()`."""
    if isinstance(q, Independent):
        return Independent(stopped(q.base_dist), q.reinterpreted_batch_ndims)
    if isinstance(q, Normal):
        return Normal(q.loc.detach(), q.scale.detach())
    if not hasattr(q, "detached"):
        raise ConfigError(
            f"objective.estimator=dreg needs a posterior whose parameters can be cut from the "
            f"graph; {type(q).__name__} has no detached()"
        )
    return q.detached()


class ModelTerms:
    """The derived terms of the protocol, written on `posterior`, `prior`, `decode` and
    `latent_parts` (shared by the models and by a conditional model's view given labels)."""

    latent_parts: dict[str, tuple[int, ...]]
    conditional = False

    def rate(
        self, q: Distribution, p: Distribution, z: Tensor, log_ratio: Tensor | None = None
    ) -> Tensor:
        return rate(q, p, z, log_ratio)

    def rate_per_dim(self, q: Distribution, p: Distribution) -> Tensor | None:
        return rate_per_dim(q, p)

    def layer_rates(self, x: Tensor, n_samples: int = 1) -> dict[str, Tensor]:
        """Rate per stochastic layer (name -> (B,)) for models with more than one; empty for
        a model with one latent (its rate is the objective's `rate`)."""
        return {}

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for codes z (*S, B, ...): shape (*S, B)."""
        return self.decode(z).log_prob(x)

    def log_weights(self, x: Tensor, z: Tensor, q: Distribution, p: Distribution) -> Tensor:
        """log p(x, z) - log q(z|x) for codes z (*S, B, ...) drawn from q: shape (*S, B)."""
        return self.log_likelihood(x, z) + p.log_prob(z) - q.log_prob(z)

    def representation(self, q: Distribution) -> Tensor:
        """The code of each example for pictures and diagnostics: E_q[z], (B, D)."""
        return q.mean.flatten(1)

    def sample_codes(self, n: int) -> Tensor:
        """n codes z ~ p(z), (n, ...)."""
        return self.prior().sample((n,))

    def sample(self, n: int) -> Tensor:
        """Means of p(x|z) for n codes z ~ p(z): (n, C, H, W)."""
        return self.decode(self.sample_codes(n)).mean

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x|z) at the posterior's representation of x: (B, C, H, W)."""
        return self.decode(self.posterior(x).mean).mean

    @property
    def latent_dim(self) -> int | None:
        """D of a model with one flat latent vector, else None."""
        if len(self.latent_parts) != 1:
            return None
        (shape,) = self.latent_parts.values()
        return shape[0] if len(shape) == 1 else None

    @property
    def flat_code_dim(self) -> int | None:
        """D when the code is one flat vector whose dimensions can be set one by one, with no
        labels to give (traversals, the manifold, disentanglement metrics); else None."""
        return None if self.conditional else self.latent_dim


class LatentVariableModel(ModelTerms, nn.Module):
    """Base class of vaelab's model families; subclasses implement posterior, prior, decode and
    latent_parts, and may override the derived terms."""

    image_shape: tuple[int, int, int]
    #: What the evaluation's figures mean for this family, when it is not the plain
    #: importance-sampled -log p(x) (evaluate.py prints it with them).
    evaluation_note: str | None = None
    #: Its codes are a codebook's vectors (`quantize`, `decode_vectors`; model=vqvae), which an
    #: objective that trains codes (objective=vq) needs.
    vector_quantised: bool = False

    #: `model.output_bias`: `none`, or `data_mean`, the decoder's output bias starting at the
    #: likelihood's parameters for the training pixels' means (Burda et al. 2015's code sets the
    #: Bernoulli decoder's to the logits of the means), set by `fit_to_data`.
    output_bias: str = "none"

    #: Some of its settings follow the training step (`set_step`; model=categorical's
    #: temperature): a callback sets them before each training step and logs
    #: `train/<name>` for each of `schedule_values()`.
    scheduled: bool = False

    def set_step(self, step: int) -> None:
        """Settings at a training step (a model with `scheduled`)."""

    def schedule_values(self) -> dict[str, Tensor]:
        return {}

    def check_objective(self, objective) -> None:
        """Refuse, with one line, an objective this model cannot be trained with."""

    def use_output_bias(self, output_bias: str) -> None:
        """Check `model.output_bias` against the model's decoder and likelihood, and keep it."""
        require(
            output_bias in OUTPUT_BIASES,
            f"model.output_bias must be one of {', '.join(OUTPUT_BIASES)}, got {output_bias!r}",
        )
        if output_bias == "data_mean":
            decoder = getattr(self, "decoder", None)
            require(
                hasattr(decoder, "set_output_bias"),
                f"model.output_bias=data_mean needs a decoder with one output bias per pixel "
                f"value (vaelab.nets.MLPDecoder), got {type(decoder).__name__}",
            )
            self.likelihood.output_bias(torch.full(self.image_shape, 0.5))  # refuses if it can't
        self.output_bias = output_bias

    @torch.no_grad()
    def fit_to_data(self, pixel_means: Tensor) -> None:
        """Data-dependent initialisation, once, before the first step of a fresh run (not on
        resume): with `output_bias=data_mean`, the decoder's output bias from the training
        pixels' means (C, H, W) in [0, 1]."""
        if self.output_bias == "data_mean":
            self.decoder.set_output_bias(self.likelihood.output_bias(pixel_means))

    def given(self, labels: Tensor | None) -> ModelTerms:
        """The model given the examples' labels (B,): itself, for a model without labels."""
        return self

    def sample_labels(self, n: int) -> Tensor | None:
        """Labels for n samples of a conditional model (classes in rows of equal length), None
        for an unconditional one."""
        return None

    def posterior(self, x: Tensor) -> Distribution:
        raise NotImplementedError

    def prior(self) -> Distribution:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Distribution:
        raise NotImplementedError


@torch.no_grad()
def prior_quantiles(prior: Distribution, probabilities: Tensor, n: int = 20000) -> Tensor:
    """Per-dimension quantiles of p(z)'s marginals at `probabilities` (P,): (P, D). Exact for a
    diagonal Gaussian prior (its icdf); otherwise empirical quantiles of n draws."""
    base = prior.base_dist if isinstance(prior, Independent) else None
    if isinstance(base, torch.distributions.Normal):
        p = probabilities.to(base.loc)[:, None]
        return base.icdf(p.expand(-1, base.loc.shape[-1]))
    draws = prior.sample((n,)).flatten(1)
    return torch.quantile(draws, probabilities.to(draws), dim=0)
