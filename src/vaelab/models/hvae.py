"""A VAE with a chain of stochastic layers (Burda, Grosse & Salakhutdinov 2015, section 5).

    generative:  p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1)
    inference:   q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})

Each conditional between stochastic layers is a diagonal Gaussian from an MLP (`hidden_dims`,
`activation`); the bottom networks are the configured encoder (x -> q(z_1|x)) and decoder
(z_1 -> p(x|z_1)), so the MLP, conv and ResNet nets all serve; the top prior p(z_L) is the
configured prior (N(0, I) or a mixture). The code of an example is the concatenation
z = (z_1, ..., z_L), one vector of sum(latent_dims) numbers, and the two chains are torch
Distributions over it (`ChainPosterior`, `ChainPrior`): log-densities sum the layers' terms,
`rsample` draws ancestrally with reparameterised draws at every layer. Every objective and the
importance-sampled evaluation then work unchanged: the rate is the Monte-Carlo
log q(z|x) - log p(z) summed over layers (no closed form between the chains), and IS weights use
the full joint log p(x, z_1..L) - log q(z_1..L | x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from torch.func import functional_call

from vaelab.errors import ConfigError, require
from vaelab.likelihoods import Likelihood, at_least_float32
from vaelab.models.base import LatentVariableModel, stopped
from vaelab.models.vae import DecoderFactory, EncoderFactory, PriorFactory, gaussian
from vaelab.nets.encoders import Activation, check_activation, check_sizes, mlp
from vaelab.nets.init import initialise

EMPTY = torch.Size()

#: (code of the layer it conditions on (..., d_in)) -> diagonal Gaussian (..., d_out)
Conditional = Callable[[Tensor], Distribution]


class GaussianLayer(nn.Module):
    """An MLP from one stochastic layer's code to the mean and log-variance of the next one's
    diagonal Gaussian; the log-variance is bounded like the VAE posterior's."""

    def __init__(
        self, d_in: int, d_out: int, hidden_dims: Sequence[int], activation: Activation
    ) -> None:
        super().__init__()
        # Linear-activation for each hidden layer, the output layer linear
        self.net = mlp([d_in, *hidden_dims, 2 * d_out], activation)

    def forward(self, z: Tensor) -> Distribution:
        return gaussian(self.net(z))

    def detached(self) -> Conditional:
        """The same map with the parameters cut from the graph (the inputs keep theirs)."""
        params = {name: p.detach() for name, p in self.net.named_parameters()}
        return lambda z: gaussian(functional_call(self.net, params, (z,)))


class ChainPosterior(Distribution):
    """q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1}) over the concatenated code, batch shape (B,)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, first: Distribution, layers: Sequence[Conditional], dims: Sequence[int]):
        self.first, self.layers, self.dims = first, list(layers), list(dims)
        super().__init__(first.batch_shape, torch.Size([sum(dims)]), validate_args=None)

    def rsample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        codes = [self.first.rsample(sample_shape)]  # (*S, B, d_1)
        for layer in self.layers:
            codes.append(layer(codes[-1]).rsample())
        return torch.cat(codes, dim=-1)

    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        codes = value.split(self.dims, dim=-1)
        total = self.first.log_prob(codes[0])
        for layer, below, z in zip(self.layers, codes[:-1], codes[1:], strict=True):
            total = total + layer(below).log_prob(z)
        return total

    @property
    def mean(self) -> Tensor:
        """The ancestral mean: E[z_1|x], then each layer's mean given the mean below (the
        representation pictures use; exact for z_1, a deterministic summary above)."""
        codes = [self.first.mean]
        for layer in self.layers:
            codes.append(layer(codes[-1]).mean)
        return torch.cat(codes, dim=-1)

    def detached(self) -> ChainPosterior:
        """The chain with every parameter of q cut from the graph, the codes' paths kept (for
        the doubly reparameterised gradient)."""
        layers = [layer.detached() for layer in self.layers]
        return ChainPosterior(stopped(self.first), layers, self.dims)


class ChainPrior(Distribution):
    """p(z_L) p(z_{L-1}|z_L) ... p(z_1|z_2) over the concatenated code (z_1, ..., z_L)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, top: Distribution, layers: Sequence[Conditional], dims: Sequence[int]):
        """`layers[l]` maps z_{l+2} to p(z_{l+1} | z_{l+2}) (0-based l; the last maps z_L)."""
        self.top, self.layers, self.dims = top, list(layers), list(dims)
        super().__init__(top.batch_shape, torch.Size([sum(dims)]), validate_args=None)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        codes = value.split(self.dims, dim=-1)
        total = self.top.log_prob(codes[-1])
        for layer, z, above in zip(self.layers, codes[:-1], codes[1:], strict=True):
            total = total + layer(above).log_prob(z)
        return total

    def rsample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        codes = [self.top.rsample(sample_shape)]
        for layer in reversed(self.layers):
            codes.insert(0, layer(codes[0]).rsample())
        return torch.cat(codes, dim=-1)

    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        with torch.no_grad():
            codes = [self.top.sample(sample_shape)]  # a mixture top has no rsample
            for layer in reversed(self.layers):
                codes.insert(0, layer(codes[0]).sample())
            return torch.cat(codes, dim=-1)


class HierarchicalVAE(LatentVariableModel):
    """L = len(latent_dims) stochastic layers, z_1 next to the data. encoder (B, C, H, W) ->
    (B, 2 latent_dims[0]), decoder (N, latent_dims[0]) -> (N, likelihood.out_channels(C), H, W),
    and between layers l and l+1 one MLP of `hidden_dims` each way (inference up, generation
    down). The prior factory builds p(z_L) for latent_dims[-1] dimensions."""

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        prior: PriorFactory,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        latent_dims: Sequence[int] = (100, 50),
        hidden_dims: Sequence[int] = (100, 100),
        activation: Activation = nn.Tanh,
        init: str = "default",
        init_bias: str = "zero",
        output_bias: str = "none",
    ) -> None:
        """`init`, `init_bias`, `output_bias`: as for the VAE (vaelab.models.VAE), the init
        applied to every network of both chains."""
        super().__init__()
        latent_dims = check_sizes("model.latent_dims", latent_dims)
        require(
            len(latent_dims) >= 2,
            f"model.latent_dims must list at least two stochastic layers (z_1 next to the data "
            f"first), got {latent_dims}; model=mlp is the one-layer VAE",
        )
        hidden_dims = check_sizes("model.hidden_dims", hidden_dims)
        check_activation("HierarchicalVAE", activation)
        c, h, w = (int(s) for s in image_shape)
        self.image_shape = (c, h, w)
        self.dims = latent_dims
        self.latent_parts = {f"z{i + 1}": (d,) for i, d in enumerate(latent_dims)}
        self.likelihood = likelihood
        self.encoder = encoder(in_shape=self.image_shape, out_dim=2 * latent_dims[0])
        self.decoder = decoder(
            latent_dim=latent_dims[0], out_shape=(likelihood.out_channels(c), h, w)
        )
        pairs = list(zip(latent_dims[:-1], latent_dims[1:], strict=True))
        self.up = nn.ModuleList(GaussianLayer(a, b, hidden_dims, activation) for a, b in pairs)
        self.down = nn.ModuleList(GaussianLayer(b, a, hidden_dims, activation) for a, b in pairs)
        for net in (self.encoder, self.decoder, self.up, self.down):
            initialise(net, init, init_bias)
        self.use_output_bias(output_bias)
        self.top_prior = prior(latent_dim=latent_dims[-1], image_shape=self.image_shape)
        if self.top_prior.encodes_inputs:
            raise ConfigError(
                "prior=vampprior needs q(z_L|x) in closed form, which a chain of stochastic "
                "layers has not; use prior=standard_normal or prior=mog with model=hvae"
            )

    def posterior(self, x: Tensor) -> Distribution:
        first = gaussian(self.encoder(x))  # q(z_1|x), batch (B,)
        return ChainPosterior(first, list(self.up), self.dims)

    def prior(self) -> Distribution:
        return ChainPrior(self.top_prior(self), list(self.down), self.dims)

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z_1) for codes z (*S, sum(latent_dims)) (or z_1 alone, (*S, latent_dims[0]))."""
        z1 = z[..., : self.dims[0]]
        params = at_least_float32(self.decoder(z1.reshape(-1, self.dims[0])))
        return self.likelihood(params.view(*z.shape[:-1], *params.shape[1:]))

    def layer_rates(self, x: Tensor, n_samples: int = 1) -> dict[str, Tensor]:
        """Per-layer Monte-Carlo rates E_q[log q(z_l | .) - log p(z_l | .)] per example (B,),
        on n_samples joint draws: which layers carry information (they sum to the rate's
        estimate on the same draws)."""
        q, p = self.posterior(x), self.prior()
        codes = q.sample((n_samples,)).split(self.dims, dim=-1)
        below = [q.first] + [layer(z) for layer, z in zip(q.layers, codes[:-1], strict=True)]
        above = [layer(z) for layer, z in zip(p.layers, codes[1:], strict=True)] + [p.top]
        return {
            f"z{i + 1}": (ql.log_prob(z) - pl.log_prob(z)).mean(0)
            for i, (ql, pl, z) in enumerate(zip(below, above, codes, strict=True))
        }
