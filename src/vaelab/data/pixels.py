"""Stored pixels -> model inputs, on the device, per batch.

Binarisation (`binarize`):
- `dynamic`: training images are resampled x ~ Bernoulli(intensity) every time they are drawn
  (on the device, per batch); validation and test images are binarised once with `binarize_seed`
  so evaluation numbers are deterministic.
- `static`: every split binarised once with `binarize_seed`.
- `none`: 8-bit intensities; with `dequantize` x = (pixel + u) / 256, u ~ U(0, 1), so a density
  on [0, 1] bounds the probability of the 8-bit image (Theis et al. 2016) and bits per dimension
  are comparable with the literature; without it x = pixel / 255, the values a discretised
  likelihood gives probabilities to (a density's bpd is undefined there). `auto` (default):
  dequantised for a density, k / 255 for a likelihood over the 256 values (`accepts`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(bits: Tensor) -> Tensor:
    """0/1 as float32; through a uint8 view, which is ~10x faster than bool -> float on CPU."""
    return bits.view(torch.uint8).float()


def random_bytes(n: int, device: torch.device | str = "cpu") -> Tensor:
    """n uniform random bytes from torch's generator, drawn as 64-bit words: about 5x cheaper on
    a CPU than torch.randint's one 32-bit draw per byte."""
    words = torch.empty(-(-n // 8), dtype=torch.int64, device=device)
    return words.random_(-(2**63), None).view(torch.uint8)[:n]


def bernoulli_255(pixels: Tensor) -> Tensor:
    """x ~ Bernoulli(pixel / 255) per uint8 pixel p, from uniform random bytes r0, r1, r2:

        x = [r0 < p] or [r0 = p] and ([r1 < p] or [r1 = p] and ([r2 < p] or [r2 = p = 255]))

    has P(x) = p/256 + p/256² + p/256³ (+ 1/256³ at p = 255): p/255 to a relative 2^-24 (a
    float32 uniform's resolution), black pixels always 0 and white ones always 1. Only a tie
    (r = p, one pixel in 256) reads the next byte, so on a CPU, where drawing the random bits is
    most of the cost, the next bytes are drawn for the tied pixels alone (~1.004 bytes per pixel
    instead of 3; figures in benchmarks/README.md); on an accelerator, where picking out the ties
    would wait for the device, all three bytes are drawn for every pixel (`from_three_bytes`)."""
    flat = pixels.reshape(-1)
    if flat.device.type == "cpu":
        return refine_ties(flat).view(pixels.shape)
    r0, r1, r2 = random_bytes(3 * flat.numel(), flat.device).view(3, -1)
    return from_three_bytes(flat, r0, r1, r2).view(pixels.shape)


def refine_ties(p: Tensor, depth: int = 0) -> Tensor:
    """The rule of `bernoulli_255` byte by byte: one byte per pixel, then the tied pixels again."""
    r = random_bytes(p.numel(), p.device)
    x, tie = r < p, r == p
    if depth == 2:
        return x | (tie & (p == 255))
    ties = tie.nonzero().squeeze(1)
    if len(ties):
        x[ties] = refine_ties(p[ties], depth + 1)
    return x


def from_three_bytes(p: Tensor, r0: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    """The rule of `bernoulli_255` on three given bytes per pixel, all at once."""
    white = torch.full_like(p, 255)  # a scalar operand is ~10x slower on CPU
    last = (r2 < p) | ((r2 == p) & (p == white))
    return (r0 < p) | ((r0 == p) & ((r1 < p) | ((r1 == p) & last)))


def model_inputs(images: Tensor, dynamic: bool, dequantize: bool) -> Tensor:
    """Stored pixels (bool or uint8, on any device) -> float model inputs in [0, 1]: bool as
    0/1; uint8 binarised afresh (`dynamic`), dequantised, or k / 255."""
    if images.dtype == torch.bool:
        return as_float(images)
    if dynamic:
        return as_float(bernoulli_255(images))
    intensity = images.float()
    if dequantize:
        # u in [0, 1); the clamp stops float32 rounding pixel + u up to pixel + 1.
        noisy = intensity + torch.rand_like(intensity)
        return torch.minimum(noisy, intensity + (1 - 2**-16)) / 256
    return intensity / 255


def corrupted(x: Tensor, noise: str, noise_std: float, noise_prob: float) -> Tensor:
    """The encoder's view of clean inputs x in [0, 1], per `noise`: gaussian: clamp(x +
    noise_std * eps, 0, 1); salt_and_pepper: a `noise_prob` fraction of pixels set to 0 or 1 at
    random; mask: a `noise_prob` fraction of pixels set to 0."""
    if noise == "none":
        return x
    if noise == "gaussian":
        return (x + noise_std * torch.randn_like(x)).clamp(0, 1)
    hit = torch.rand_like(x) < noise_prob
    if noise == "mask":
        return x.masked_fill(hit, 0.0)
    salt = (torch.rand_like(x) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)
