"""Encoders map an image batch (B, C, H, W) to a feature vector (B, out_dim).

The VAE asks for out_dim = 2 * latent_dim (posterior mean and log-variance); the sizes of the
input come from the DataModule at build time, never from a config file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import torch
from torch import Tensor, nn

from vaelab.errors import require

Activation = Callable[[], nn.Module]


def check_activation(owner: str, activation: object) -> None:
    require(
        callable(activation),
        f"{owner} activation must build a module, e.g. model.encoder.activation._target_="
        f"torch.nn.Tanh (a _partial_ class), got {activation!r}",
    )


class GatedDense(nn.Module):
    """h(x) * sigmoid(g(x)) with two affine maps h and g (Dauphin et al. 2017), the hidden layer
    of the VampPrior paper's networks (Tomczak & Welling 2018, `GatedDense` in its code): the
    gate lets each unit be switched off per input, with no other nonlinearity needed."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.h = nn.Linear(n_in, n_out)
        self.g = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def mlp(sizes: Sequence[int], activation: Activation, gated: bool = False) -> nn.Sequential:
    """Layers of the given sizes with an activation between (none after the last); the hidden
    ones Linear, or `GatedDense` when `gated` (the activation, e.g. torch.nn.Identity, follows
    the gate), the output layer always Linear."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        hidden = i < len(sizes) - 2
        layers.append(GatedDense(n_in, n_out) if hidden and gated else nn.Linear(n_in, n_out))
        if hidden:
            layers.append(activation())
    return nn.Sequential(*layers)


def check_gated(owner: str, gated: object) -> bool:
    require(isinstance(gated, bool), f"{owner} gated must be true or false, got {gated!r}")
    return gated


def check_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    require(
        all(isinstance(s, int) and s >= 1 for s in sizes),
        f"{name} must be positive integers, got {sizes}",
    )
    return sizes


class MLPEncoder(nn.Module):
    """Flatten, then Linear-activation layers of `hidden_dims` (gated ones with `gated`), then
    Linear to `out_dim`."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        hidden_dims: Sequence[int] = (512, 256),
        activation: Activation = nn.ReLU,
        gated: bool = False,
    ) -> None:
        super().__init__()
        check_activation(type(self).__name__, activation)
        hidden_dims = check_sizes(f"{type(self).__name__} hidden_dims", hidden_dims)
        gated = check_gated(type(self).__name__, gated)
        self.net = nn.Sequential(
            nn.Flatten(), mlp([prod(in_shape), *hidden_dims, out_dim], activation, gated)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.net(x)


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions (each halves H and W), then Linear to `out_dim`.

    With the default two layers, 28x28 becomes 7x7 and 32x32 becomes 8x8; any channel count.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        activation: Activation = nn.ReLU,
    ) -> None:
        super().__init__()
        check_activation(type(self).__name__, activation)
        channels = check_sizes(f"{type(self).__name__} channels", channels)
        c, h, w = check_conv_shape(in_shape, len(channels))
        layers: list[nn.Module] = []
        for n_in, n_out in zip([c, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(n_in, n_out, kernel_size=4, stride=2, padding=1), activation()]
        scale = 2 ** len(channels)
        flat = channels[-1] * (h // scale) * (w // scale)
        self.net = nn.Sequential(
            *layers, nn.Flatten(), mlp([flat, hidden_dim, out_dim], activation)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.net(x)


def check_conv_shape(
    shape: Sequence[int], n_layers: int, owner: str = "conv model", hint: str = ""
) -> tuple[int, int, int]:
    """(C, H, W) if H and W survive n_layers halvings exactly, else a ConfigError."""
    require(len(shape) == 3, f"{owner} needs images shaped (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    scale = 2**n_layers
    hint = hint or "e.g. 28x28 or 32x32 work with 2 layers"
    require(
        h % scale == 0 and w % scale == 0 and h >= scale and w >= scale,
        f"{owner} with {n_layers} stride-2 layers needs image height and width divisible by "
        f"{scale}, got {c}x{h}x{w} ({hint})",
    )
    return c, h, w
