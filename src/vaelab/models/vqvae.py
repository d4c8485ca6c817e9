"""The VQ-VAE of van den Oord, Vinyals & Kavukcuoglu (2017) and its autoregressive code prior.

A convolutional encoder maps x to a grid of vectors z_e(x) (B, D, h, w); each is replaced by its
nearest of K codebook vectors e_k, giving the code grid k(x) (B, h, w) and z_q = e_{k(x)}; the
decoder maps z_q to p(x|z_q). Training (objective=vq) passes gradients straight through the
quantiser (z_e + sg(z_q - z_e)), adds the commitment loss beta ||z_e - sg(z_q)||^2, and updates
the codebook by exponential moving averages of the assigned encoder outputs (default; Razavi et
al. 2019) or by the codebook loss ||sg(z_e) - e||^2; codes unused for a while can be restarted
at random encoder outputs.

On the shared protocol the posterior q(z|x) is a point mass on the code grid k(x) (`CodeGrid`),
the prior p(z) a distribution over grids of K-way codes: uniform (stage one: KL = h w log K, the
paper's constant) or a PixelCNN over the grid (`model.code_prior=pixelcnn`, trained as a second
stage on the frozen autoencoder: experiment=vqvae_prior). The bound
log p(x) >= log p(x | z_q(x)) + log p(k(x)) is then what the ELBO, the importance-sampled
evaluation (exact at any k for a point-mass posterior, so it uses one draw) and bits/dim report.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.distributions import Distribution

from vaelab.errors import ConfigError, require, require_int
from vaelab.likelihoods import Likelihood, at_least_float32
from vaelab.models.base import LatentVariableModel
from vaelab.models.code_priors import AutoregressiveCodes, CodeGrid, PixelCNN, uniform_codes
from vaelab.models.quantizer import VectorQuantizer
from vaelab.nets.encoders import check_conv_shape
from vaelab.priors import StandardNormal

CODE_PRIORS = ("uniform", "pixelcnn")


class Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))) (van den Oord et al. 2017, section 4.1)."""

    def __init__(self, channels: int, inner: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, inner, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(inner, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def encoder_net(c: int, hidden: int, inner: int, n_down: int, n_res: int, dim: int) -> nn.Module:
    layers: list[nn.Module] = []
    n_in = c
    for i in range(n_down):
        n_out = hidden if i == n_down - 1 else max(hidden // 2, 1)
        layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), nn.ReLU()]
        n_in = n_out
    layers.append(nn.Conv2d(n_in, hidden, 3, padding=1))
    layers += [Residual(hidden, inner) for _ in range(n_res)]
    layers += [nn.ReLU(), nn.Conv2d(hidden, dim, 1)]
    return nn.Sequential(*layers)


def decoder_net(dim: int, hidden: int, inner: int, n_up: int, n_res: int, c_out: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(dim, hidden, 3, padding=1)]
    layers += [Residual(hidden, inner) for _ in range(n_res)]
    layers.append(nn.ReLU())
    n_in = hidden
    for i in range(n_up):
        last = i == n_up - 1
        n_out = c_out if last else max(hidden // 2, 1)
        layers.append(nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        n_in = n_out
    return nn.Sequential(*layers)


# --- the model ----------------------------------------------------------------------------------
class VQVAE(LatentVariableModel):
    """Encoder (B, C, H, W) -> (B, code_dim, H/2^n, W/2^n), n = `downsamples`; K = `n_codes`
    codes; decoder back to (B, likelihood.out_channels(C), H, W). `code_prior`: uniform or
    pixelcnn (`prior_channels`, `prior_layers`). `freeze_autoencoder`: encoder, decoder and
    codebook fixed (the second stage, which trains the code prior alone)."""

    vector_quantised = True
    evaluation_note = (
        "point-mass posterior on the code grid k(x): nll_is = -log p(x | z_q(x)) - log p(k(x)), "
        "an upper bound on -log p(x) computed with one draw whatever eval.k"
    )

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        prior=None,
        n_codes: int = 512,
        code_dim: int = 64,
        hidden_channels: int = 128,
        residual_channels: int = 32,
        downsamples: int = 2,
        residual_blocks: int = 2,
        codebook: str = "ema",
        ema_decay: float = 0.99,
        restart_threshold: float = 0.0,
        code_prior: str = "uniform",
        prior_channels: int = 64,
        prior_layers: int = 6,
        freeze_autoencoder: bool = False,
    ) -> None:
        super().__init__()
        if prior is not None and getattr(prior, "func", prior) is not StandardNormal:
            name = getattr(getattr(prior, "func", prior), "__name__", repr(prior))
            raise ConfigError(
                f"model=vqvae has a discrete prior over its codes (model.code_prior=uniform or "
                f"pixelcnn); the prior group ({name}) does not apply to it"
            )
        for name, value, low in (
            ("model.hidden_channels", hidden_channels, 1),
            ("model.residual_channels", residual_channels, 1),
            ("model.downsamples", downsamples, 1),
            ("model.residual_blocks", residual_blocks, 0),
        ):
            require_int(name, value, low)
        require(
            code_prior in CODE_PRIORS,
            f"model.code_prior must be one of {', '.join(CODE_PRIORS)}, got {code_prior!r}",
        )
        c, h, w = check_conv_shape(image_shape, downsamples, owner="model=vqvae")
        self.image_shape = (c, h, w)
        self.grid = (h // 2**downsamples, w // 2**downsamples)
        self.latent_parts = {"codes": self.grid}
        self.likelihood = likelihood
        self.encoder = encoder_net(
            c, hidden_channels, residual_channels, downsamples, residual_blocks, code_dim
        )
        self.quantizer = VectorQuantizer(
            n_codes, code_dim, codebook, ema_decay, restart_threshold=restart_threshold
        )
        self.decoder = decoder_net(
            code_dim,
            hidden_channels,
            residual_channels,
            downsamples,
            residual_blocks,
            likelihood.out_channels(c),
        )
        self.code_prior = None
        if code_prior == "pixelcnn":
            self.code_prior = PixelCNN(n_codes, prior_channels, prior_layers)
        self.freeze_autoencoder = freeze_autoencoder
        if freeze_autoencoder:
            for part in (self.encoder, self.decoder, self.quantizer):
                part.requires_grad_(False)
            self.quantizer.frozen = True

    def check_objective(self, objective) -> None:
        require(
            objective.trains_codes,
            f"model=vqvae trains with objective=vq (straight-through gradients through its "
            f"discrete codes), got {objective!r}",
        )

    def train(self, mode: bool = True) -> VQVAE:
        """A frozen autoencoder stays in eval mode (no codebook updates) while the prior trains."""
        super().train(mode)
        if self.freeze_autoencoder:
            for part in (self.encoder, self.decoder, self.quantizer):
                part.eval()
        return self

    def quantize(self, x: Tensor) -> dict[str, Tensor]:
        """Encoder and quantiser: indices, straight-through z_q and the quantiser's terms."""
        return self.quantizer(at_least_float32(self.encoder(x)))

    def posterior(self, x: Tensor) -> Distribution:
        z_e = at_least_float32(self.encoder(x))
        b, d, h, w = z_e.shape
        indices = self.quantizer.assign(z_e.movedim(1, -1).reshape(-1, d)).view(b, h, w)
        return CodeGrid(indices)

    def prior(self) -> Distribution:
        if self.code_prior is None:
            return uniform_codes(self.quantizer.n_codes, self.grid, self.quantizer.embedding)
        return AutoregressiveCodes(self.code_prior, self.grid)

    def decode_vectors(self, z_q: Tensor) -> Distribution:
        """p(x | z_q) for code vectors (N, D, h, w)."""
        return self.likelihood(at_least_float32(self.decoder(z_q)))

    def decode(self, z: Tensor) -> Distribution:
        """p(x | codes) for index grids z (*S, h, w): batch shape S."""
        indices = z.long().reshape(-1, *self.grid)
        params = at_least_float32(self.decoder(self.quantizer.lookup(indices)))
        return self.likelihood(params.view(*z.shape[:-2], *params.shape[1:]))

    def representation(self, q: Distribution) -> Tensor:
        """The code vectors averaged over the grid, (B, code_dim): a summary for the
        diagnostics and the projector."""
        return self.quantizer.lookup(q.indices).mean((-2, -1))

    def sample_codes(self, n: int) -> Tensor:
        return self.prior().sample((n,))
