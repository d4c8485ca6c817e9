"""Residual encoder and decoder for colour images (32x32 CIFAR-10 / SVHN, 64x64 CelebA) and any
other size that halves evenly: stages of pre-activation residual blocks (norm, activation, 3x3
convolution, twice, plus the identity), a stride-2 convolution between stages on the way down and
a nearest-neighbour upsampling and 3x3 convolution on the way up; a linear layer maps the last
feature map to the encoder's outputs and the code to the decoder's first feature map.

`channels[i]` is the width of stage i; there are len(channels) - 1 halvings, so 28x28 and 32x32
take 3 stages (to 7x7 and 8x8), 64x64 takes 4 (to 8x8). `norm`: `group` (GroupNorm with
`groups` groups; batch-size independent, what VAEs with IWAE's k-fold batches need) or `none`.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from torch import Tensor, nn

from vaelab.errors import require
from vaelab.nets.encoders import Activation, check_activation, check_conv_shape, check_sizes

NORMS = ("group", "none")
RESNET_HINT = "len(channels) - 1 halvings: e.g. 3 widths for 28x28 or 32x32, 4 for 64x64"


def norm_layer(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    return nn.GroupNorm(groups, channels)


def check_norm(owner: str, norm: str, groups: int, channels: Sequence[int]) -> None:
    require(norm in NORMS, f"{owner} norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if norm == "group":
        require(
            isinstance(groups, int) and groups >= 1 and all(c % groups == 0 for c in channels),
            f"{owner} norm=group needs every channel width divisible by groups={groups}, "
            f"got channels {list(channels)}",
        )


class ResidualBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), widths unchanged."""

    def __init__(self, channels: int, norm: str, groups: int, activation: Activation) -> None:
        super().__init__()
        self.body = nn.Sequential(
            norm_layer(norm, channels, groups),
            activation(),
            nn.Conv2d(channels, channels, 3, padding=1),
            norm_layer(norm, channels, groups),
            activation(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def stage(width: int, blocks: int, norm: str, groups: int, activation: Activation) -> list:
    return [ResidualBlock(width, norm, groups, activation) for _ in range(blocks)]


def check_resnet(owner: str, channels, blocks_per_stage, norm, groups, activation) -> list[int]:
    check_activation(owner, activation)
    channels = check_sizes(f"{owner} channels", channels)
    require(
        isinstance(blocks_per_stage, int) and blocks_per_stage >= 0,
        f"{owner} blocks_per_stage must be an integer >= 0, got {blocks_per_stage!r}",
    )
    check_norm(owner, norm, groups, channels)
    return channels


class ResNetEncoder(nn.Module):
    """3x3 stem, then len(channels) stages of `blocks_per_stage` residual blocks with a stride-2
    convolution before each stage after the first, then norm, activation and Linear to out_dim."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (64, 128, 256),
        blocks_per_stage: int = 2,
        norm: str = "group",
        groups: int = 8,
        activation: Activation = nn.SiLU,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        channels = check_resnet(owner, channels, blocks_per_stage, norm, groups, activation)
        c, h, w = check_conv_shape(in_shape, len(channels) - 1, owner, RESNET_HINT)
        layers: list[nn.Module] = [nn.Conv2d(c, channels[0], 3, padding=1)]
        for i, width in enumerate(channels):
            if i > 0:
                layers.append(nn.Conv2d(channels[i - 1], width, 4, stride=2, padding=1))
            layers += stage(width, blocks_per_stage, norm, groups, activation)
        layers += [norm_layer(norm, channels[-1], groups), activation(), nn.Flatten()]
        scale = 2 ** (len(channels) - 1)
        layers.append(nn.Linear(channels[-1] * (h // scale) * (w // scale), out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.net(x)


class ResNetDecoder(nn.Module):
    """Mirror of ResNetEncoder: Linear to a (channels[-1], H/2^n, W/2^n) map, stages of residual
    blocks from the widest, each followed (but the last) by 2x nearest upsampling and a 3x3
    convolution to the next width, then norm, activation and a 3x3 convolution to out_shape[0]."""

    def __init__(
        self,
        latent_dim: int,
        out_shape: Sequence[int],
        channels: Sequence[int] = (64, 128, 256),
        blocks_per_stage: int = 2,
        norm: str = "group",
        groups: int = 8,
        activation: Activation = nn.SiLU,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        channels = check_resnet(owner, channels, blocks_per_stage, norm, groups, activation)
        c_out, h, w = check_conv_shape(out_shape, len(channels) - 1, owner, RESNET_HINT)
        scale = 2 ** (len(channels) - 1)
        self.start = (channels[-1], h // scale, w // scale)
        self.project = nn.Linear(latent_dim, prod(self.start))
        widths = list(reversed(channels))
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers += stage(width, blocks_per_stage, norm, groups, activation)
            if i < len(widths) - 1:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(width, widths[i + 1], 3, padding=1),
                ]
        layers += [
            norm_layer(norm, widths[-1], groups),
            activation(),
            nn.Conv2d(widths[-1], c_out, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # (N, latent_dim) -> (N, P*C, H, W)
        return self.net(self.project(z).view(-1, *self.start))
