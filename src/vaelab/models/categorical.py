"""A VAE with categorical codes (Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017): N variables
of K classes each, z one-hot (N, K), a uniform prior p(z) = prod_n 1/K, and q(z|x) = prod_n
Cat(pi_n(x)).

Training draws Gumbel-softmax (Concrete) relaxed codes y = softmax((log pi + g) / tau), g Gumbel
noise, at a temperature tau = max(temperature_min, temperature * exp(-anneal_rate * step))
(annealed as in Jang et al.), decodes them, and adds the closed-form KL of the *discrete*
posterior to the uniform prior, sum_n sum_k pi_nk log(K pi_nk), as Jang et al.'s code does.
Everything else uses the discrete posterior: in eval mode `rsample` returns one-hot draws, so
validation and test ELBOs and evaluate.py's importance-sampled bound (one-hot codes, log q and
log p of those codes) are bounds on log p(x) of the model the decoder defines on one-hot codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    OneHotCategorical,
    RelaxedOneHotCategorical,
    constraints,
    register_kl,
)

from vaelab.errors import ConfigError, require, require_int, require_number
from vaelab.likelihoods import Likelihood, at_least_float32
from vaelab.models.base import LatentVariableModel
from vaelab.nets.init import initialise
from vaelab.priors import StandardNormal


class CategoricalPosterior(Distribution):
    """prod_n Cat(softmax(logits_n)) over one-hot codes, batch (B,), event (N, K). `rsample` is
    the Gumbel-softmax relaxation at `temperature`, or (temperature None: evaluation) a one-hot
    draw; `log_prob` is the discrete posterior's, for one-hot codes."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.one_hot, 1)
    has_rsample = True

    def __init__(self, logits: Tensor, temperature: Tensor | None = None) -> None:
        self.log_probs = torch.log_softmax(logits, dim=-1)  # (B, N, K)
        self.temperature = temperature
        super().__init__(logits.shape[:-2], logits.shape[-2:], validate_args=False)

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @property
    def mean(self) -> Tensor:
        return self.probs

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return OneHotCategorical(logits=self.log_probs).sample(sample_shape)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        if self.temperature is None:
            return self.sample(sample_shape)
        relaxed = RelaxedOneHotCategorical(self.temperature, logits=self.log_probs)
        return relaxed.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """log q(z|x) of one-hot codes (*S, B, N, K): (*S, B)."""
        return (value * self.log_probs).sum((-1, -2))

    def entropy(self) -> Tensor:
        return -(self.probs * self.log_probs).sum((-1, -2))


@register_kl(CategoricalPosterior, Independent)
def kl_categorical_posterior(q: CategoricalPosterior, p: Independent) -> Tensor:
    """sum_n KL(Cat(pi_n) || p_n) for a prior of independent one-hot categoricals."""
    if not isinstance(p.base_dist, OneHotCategorical) or p.event_shape != q.event_shape:
        raise NotImplementedError
    log_p = torch.log_softmax(p.base_dist.logits, dim=-1)
    return (q.probs * (q.log_probs - log_p)).sum((-1, -2))


class CategoricalVAE(LatentVariableModel):
    """`n_variables` categorical variables of `n_classes` each; encoder (B, C, H, W) ->
    (B, N K) logits, decoder (M, N K) (the flattened one-hot or relaxed code) -> the
    likelihood's parameters. Trains with objective=elbo only (see the module docstring)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        encoder,
        decoder,
        prior=None,
        n_variables: int = 30,
        n_classes: int = 10,
        temperature: float = 1.0,
        temperature_min: float = 0.5,
        anneal_rate: float = 3e-5,
        init: str = "default",
        init_bias: str = "zero",
        output_bias: str = "none",
    ) -> None:
        super().__init__()
        require_int("model.n_variables", n_variables, 1)
        require_int("model.n_classes", n_classes, 2)
        require_number("model.temperature_min", temperature_min, 1e-6)
        require_number("model.temperature", temperature, temperature_min)
        require_number("model.anneal_rate", anneal_rate, 0)
        if prior is not None and getattr(prior, "func", prior) is not StandardNormal:
            name = getattr(getattr(prior, "func", prior), "__name__", prior)
            raise ConfigError(
                f"model=categorical has a uniform prior over its categories; the prior group "
                f"({name}) does not apply: leave prior=standard_normal"
            )
        c, h, w = (int(s) for s in image_shape)
        self.image_shape = (c, h, w)
        self.latent_parts = {"z": (n_variables, n_classes)}
        self.likelihood = likelihood
        self.encoder = encoder(in_shape=self.image_shape, out_dim=n_variables * n_classes)
        self.decoder = decoder(
            latent_dim=n_variables * n_classes, out_shape=(likelihood.out_channels(c), h, w)
        )
        initialise(self.encoder, init, init_bias)
        initialise(self.decoder, init, init_bias)
        self.use_output_bias(output_bias)
        self.schedule = (float(temperature), float(temperature_min), float(anneal_rate))
        # the current temperature, saved with the weights (a resumed run continues the schedule)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("uniform_logits", torch.zeros(n_variables, n_classes))

    def check_objective(self, objective) -> None:
        from vaelab.objectives import ELBO

        require(
            type(objective) is ELBO and objective.estimator == "standard",
            f"model=categorical trains with objective=elbo (the relaxed codes have no density "
            f"the discrete posterior's log q can score), got {objective!r}",
        )

    scheduled = True

    def set_step(self, step: int) -> None:
        """The temperature at a training step."""
        start, low, rate = self.schedule
        self.temperature.fill_(max(low, start * math.exp(-rate * step)))

    def schedule_values(self) -> dict[str, Tensor]:
        return {"temperature": self.temperature}

    def posterior(self, x: Tensor) -> Distribution:
        n, k = self.latent_parts["z"]
        logits = at_least_float32(self.encoder(x)).view(-1, n, k)
        return CategoricalPosterior(logits, self.temperature if self.training else None)

    def prior(self) -> Distribution:
        """Uniform over the K classes of each of the N variables, event (N, K)."""
        return Independent(OneHotCategorical(logits=self.uniform_logits), 1)

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z (*S, N, K), one-hot or relaxed: batch S, event (C, H, W)."""
        n, k = self.latent_parts["z"]
        params = at_least_float32(self.decoder(z.reshape(-1, n * k)))
        return self.likelihood(params.view(*z.shape[:-2], *params.shape[1:]))

    def representation(self, q: Distribution) -> Tensor:
        """The posterior's class probabilities, (B, N K)."""
        return q.probs.flatten(1)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x|z) at the most probable class of each variable."""
        q = self.posterior(x)
        mode = F.one_hot(q.log_probs.argmax(-1), q.log_probs.shape[-1]).to(q.log_probs)
        return self.decode(mode).mean
