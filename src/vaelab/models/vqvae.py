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

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, constraints

from vaelab.errors import ConfigError, require, require_int, require_number
from vaelab.likelihoods import Likelihood, at_least_float32
from vaelab.models.base import LatentVariableModel
from vaelab.nets.encoders import check_conv_shape
from vaelab.priors import StandardNormal

CODEBOOKS = ("ema", "loss")
CODE_PRIORS = ("uniform", "pixelcnn")
EMPTY = torch.Size()


# --- the quantiser ------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (B, D, h, w) vectors against K codes of D numbers.

    `codebook=ema`: e_k = m_k / N_k, with N_k and m_k exponential moving averages (decay
    gamma) of the count and the sum of the encoder outputs assigned to k, the counts
    Laplace-smoothed by `epsilon` (van den Oord et al. 2017, appendix A.1). Updated in training
    mode only, all-reduced across processes under DDP. `codebook=loss`: the codebook is a
    parameter trained by ||sg(z_e) - e||^2. `restart_after` > 0: a code whose smoothed count
    falls below `restart_threshold` is moved to a random encoder output of the batch."""

    def __init__(
        self,
        n_codes: int,
        dim: int,
        codebook: str = "ema",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        restart_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        require_int("model.n_codes", n_codes, 1)
        require_int("model.code_dim", dim, 1)
        require(
            codebook in CODEBOOKS,
            f"model.codebook must be one of {', '.join(CODEBOOKS)}, got {codebook!r}",
        )
        require(0 < decay < 1, f"model.ema_decay must be in (0, 1), got {decay}")
        require_number("model.restart_threshold", restart_threshold, 0)
        self.n_codes, self.dim, self.codebook = n_codes, dim, codebook
        self.decay, self.epsilon, self.restart_threshold = decay, epsilon, restart_threshold
        init = torch.randn(n_codes, dim) / math.sqrt(dim)
        if codebook == "ema":
            self.register_buffer("embedding", init.clone())
            self.register_buffer("ema_count", torch.ones(n_codes))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.embedding = nn.Parameter(init)
        self.frozen = False

    def assign(self, flat: Tensor) -> Tensor:
        """Index of the nearest code of each row of flat (N, D): (N,)."""
        embedding = self.embedding.to(flat.dtype)
        distances = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ embedding.T
            + embedding.pow(2).sum(1)[None, :]
        )  # (N, K)
        return distances.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors of an index grid (..., h, w): (..., D, h, w)."""
        vectors = self.embedding[indices]  # (..., h, w, D)
        return vectors.movedim(-1, -3)

    def forward(self, z_e: Tensor) -> dict[str, Tensor]:
        """Quantise z_e (B, D, h, w): indices (B, h, w), z_q with straight-through gradients,
        the commitment and codebook losses (per example, summed over the grid), perplexity and
        usage of the batch's assignment."""
        b, d, h, w = z_e.shape
        flat = z_e.movedim(1, -1).reshape(-1, d)  # (N, D)
        indices = self.assign(flat.detach())
        one_hot = nn.functional.one_hot(indices, self.n_codes).to(flat.dtype)  # (N, K)
        if self.training and self.codebook == "ema" and not self.frozen:
            self.ema_update(flat.detach(), one_hot)
        quantized = self.embedding[indices].to(flat.dtype)  # (N, D)
        commitment = (flat - quantized.detach()).pow(2).view(b, -1).sum(1)
        codebook_loss = (flat.detach() - quantized).pow(2).view(b, -1).sum(1)
        straight_through = flat + (quantized - flat).detach()
        z_q = straight_through.view(b, h, w, d).movedim(-1, 1)
        return dict(
            indices=indices.view(b, h, w),
            z_q=z_q,
            commitment=commitment,
            codebook_loss=codebook_loss,
            perplexity=perplexity(one_hot.mean(0)),
            usage=(one_hot.sum(0) > 0).float().mean(),
        )

    @torch.no_grad()
    def ema_update(self, flat: Tensor, one_hot: Tensor) -> None:
        counts = one_hot.sum(0).to(self.ema_count.dtype)  # (K,)
        sums = (one_hot.T @ flat).to(self.ema_sum.dtype)  # (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.epsilon) / (total + self.n_codes * self.epsilon) * total
        self.embedding.copy_(self.ema_sum / smoothed[:, None])
        if self.restart_threshold > 0:
            self.restart(flat, smoothed)

    @torch.no_grad()
    def restart(self, flat: Tensor, smoothed: Tensor) -> None:
        """Move codes with a smoothed count below the threshold to random encoder outputs of
        this batch (the same ones on every process: the draw uses rank 0's batch)."""
        dead = smoothed < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = flat[torch.randint(len(flat), (n_dead,), device=flat.device)]
        picks = picks.to(self.embedding.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(picks, 0)
        self.embedding[dead] = picks
        self.ema_sum[dead] = picks
        self.ema_count[dead] = 1.0


def perplexity(probabilities: Tensor) -> Tensor:
    """exp(entropy) of a distribution over codes: K for a uniform use of K codes, 1 for one."""
    p = probabilities.clamp_min(1e-12)
    return torch.exp(-(probabilities * p.log()).sum())


# --- the posterior and the priors over code grids -----------------------------------------------
class CodeGrid(Distribution):
    """q(z|x) = a point mass on the code grid k(x) (B, h, w): every draw is k(x), log q = 0
    there (and -inf elsewhere), so log p(x, z) - log q(z|x) is the same for every draw."""

    arg_constraints: dict = {}
    support = constraints.integer_interval(0, 2**62)
    has_rsample = False
    #: every draw is the same: an importance-sampled estimate is exact with one draw
    point_mass = True

    def __init__(self, indices: Tensor) -> None:
        self.indices = indices
        super().__init__(indices.shape[:1], indices.shape[1:], validate_args=False)

    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        return self.indices.expand(*sample_shape, *self.indices.shape)

    def rsample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        raise ConfigError(
            "model=vqvae has a point-mass posterior on discrete codes, which has no "
            "reparameterised draws: train it with objective=vq (straight-through gradients)"
        )

    def log_prob(self, value: Tensor) -> Tensor:
        same = (value == self.indices).flatten(-2).all(-1)
        return torch.where(same, 0.0, -math.inf).to(torch.float32)

    @property
    def mean(self) -> Tensor:
        return self.indices


def uniform_codes(n_codes: int, grid: tuple[int, int], like: Tensor) -> Distribution:
    """p(k) = 1/K at every position, independently: log p = -h w log K."""
    logits = like.new_zeros(*grid, n_codes)
    return Independent(Categorical(logits=logits), 2)


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the positions before the centre in raster order (type A),
    or those and the centre (type B) (van den Oord et al. 2016, PixelCNN)."""

    def __init__(self, mask_type: str, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__(n_in, n_out, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Logits (N, K, h, w) of each position's code given the codes before it: an embedding of
    the codes, a 7x7 type-A masked convolution, `n_layers` residual blocks of ReLU + 3x3 type-B
    masked convolutions, and 1x1 convolutions to K logits."""

    def __init__(self, n_codes: int, channels: int = 64, n_layers: int = 6) -> None:
        super().__init__()
        require_int("model.prior_channels", channels, 1)
        require_int("model.prior_layers", n_layers, 0)
        self.n_codes = n_codes
        self.embed = nn.Embedding(n_codes, channels)
        self.first = MaskedConv2d("A", channels, channels, 7)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), MaskedConv2d("B", channels, channels, 3))
            for _ in range(n_layers)
        )
        self.out = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, n_codes, 1)
        )

    def forward(self, codes: Tensor) -> Tensor:  # (N, h, w) -> (N, K, h, w)
        h = self.first(self.embed(codes).movedim(-1, 1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class AutoregressiveCodes(Distribution):
    """p(k) = prod_i p(k_i | k_<i) over the grid in raster order, from a PixelCNN."""

    arg_constraints: dict = {}
    support = constraints.integer_interval(0, 2**62)

    def __init__(self, net: PixelCNN, grid: tuple[int, int]) -> None:
        self.net, self.grid = net, grid
        super().__init__(EMPTY, torch.Size(grid), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        codes = value.long().reshape(-1, *self.grid)  # (N, h, w)
        log_p = torch.log_softmax(at_least_float32(self.net(codes)), dim=1)
        picked = log_p.gather(1, codes[:, None]).squeeze(1)  # (N, h, w)
        return picked.flatten(1).sum(1).view(value.shape[:-2])

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = EMPTY) -> Tensor:
        """Ancestral sampling, one position at a time (h w network passes)."""
        n = math.prod(sample_shape)
        device = self.net.embed.weight.device
        codes = torch.zeros(n, *self.grid, dtype=torch.long, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                logits = at_least_float32(self.net(codes)[:, :, i, j])
                codes[:, i, j] = Categorical(logits=logits).sample()
        return codes.view(*sample_shape, *self.grid)


# --- networks -----------------------------------------------------------------------------------
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
