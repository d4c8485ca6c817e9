"""The vector quantiser of a VQ-VAE (van den Oord et al. 2017): nearest codebook vectors,
straight-through gradients, the commitment loss, codebook updates by moving averages (Razavi et
al. 2019) or by the codebook loss, restarts of unused codes."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vaelab.errors import require, require_int, require_number

CODEBOOKS = ("ema", "loss")


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
