"""Decoders map latent codes (N, latent_dim) to distribution parameters (N, P*C, H, W).

P, the number of parameters per pixel value, comes from the likelihood (1 for Bernoulli logits,
2 for a Gaussian's mean and log-variance); the decoder is told out_shape = (P*C, H, W) at build
time, so no config ever states an output channel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import Tensor, nn

from vaelab.nets.encoders import (
    Activation,
    check_activation,
    check_conv_shape,
    check_gated,
    check_sizes,
    mlp,
)


class MLPDecoder(nn.Module):
    """Mirror of MLPEncoder: layers of reversed `hidden_dims` (gated ones with `gated`), then
    Linear to every output value, reshaped to out_shape."""

    def __init__(
        self,
        latent_dim: int,
        out_shape: Sequence[int],
        hidden_dims: Sequence[int] = (512, 256),
        activation: Activation = nn.ReLU,
        gated: bool = False,
    ) -> None:
        super().__init__()
        check_activation(type(self).__name__, activation)
        hidden_dims = check_sizes(f"{type(self).__name__} hidden_dims", hidden_dims)
        gated = check_gated(type(self).__name__, gated)
        self.out_shape = tuple(out_shape)
        self.net = mlp([latent_dim, *reversed(hidden_dims), prod(out_shape)], activation, gated)

    def forward(self, z: Tensor) -> Tensor:  # (N, latent_dim) -> (N, P*C, H, W)
        return self.net(z).view(-1, *self.out_shape)

    @torch.no_grad()
    def set_output_bias(self, bias: Tensor) -> None:
        """Start the output layer's bias at `bias` (out_shape): one bias per output value, so
        an all-zero hidden state decodes to exactly those parameters."""
        self.net[-1].bias.copy_(bias.reshape(-1).to(self.net[-1].bias))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: Linear to a (channels[-1], H/2^n, W/2^n) map, then stride-2
    4x4 transposed convolutions back to (H, W), ending in out_shape[0] channels."""

    def __init__(
        self,
        latent_dim: int,
        out_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        activation: Activation = nn.ReLU,
    ) -> None:
        super().__init__()
        check_activation(type(self).__name__, activation)
        channels = check_sizes(f"{type(self).__name__} channels", channels)
        c_out, h, w = check_conv_shape(out_shape, len(channels))
        scale = 2 ** len(channels)
        self.start = (channels[-1], h // scale, w // scale)
        layers: list[nn.Module] = []
        reversed_channels = list(reversed(channels))
        for n_in, n_out in zip(reversed_channels[:-1], reversed_channels[1:], strict=True):
            layers += [nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1), activation()]
        layers.append(nn.ConvTranspose2d(reversed_channels[-1], c_out, 4, stride=2, padding=1))
        self.project = nn.Sequential(
            mlp([latent_dim, hidden_dim, prod(self.start)], activation), activation()
        )
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # (N, latent_dim) -> (N, P*C, H, W)
        return self.net(self.project(z).view(-1, *self.start))
