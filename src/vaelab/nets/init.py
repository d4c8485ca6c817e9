"""Weight initialisation schemes of the papers' networks (`model.init`).

- `default`: PyTorch's own, left as built (Linear and Conv: weights and biases
  U(-1/sqrt(fan_in), +1/sqrt(fan_in)), so Var W = 1 / (3 fan_in)).
- `glorot_uniform` (Glorot & Bengio 2010; Burda et al. 2015's code): W ~ U(-a, a),
  a = sqrt(6 / (fan_in + fan_out)), so Var W = 2 / (fan_in + fan_out).
- `glorot_normal`: W ~ N(0, 2 / (fan_in + fan_out)).
- `he_normal` (He et al. 2015; the VampPrior code's `he_init`): W ~ N(0, 2 / fan_in).
- `he_uniform`: W ~ U(-a, a), a = sqrt(6 / fan_in), the same variance.
Biases are zeroed under these schemes, or kept as PyTorch made them (`BIASES`).

Applied to every Linear, Conv and ConvTranspose layer of the networks a model owns (normalisation
layers keep their own); fans are torch's (`nn.init`: a transposed convolution's fan_in is its
output channels times the kernel size).
"""

from __future__ import annotations

import math

from torch import nn

from vaelab.errors import require

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose1d)
SCHEMES = ("default", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal")
#: `model.init_bias` under a scheme other than `default`: `zero` (Glorot's and Burda's), or
#: `default`, PyTorch's U(-1/sqrt(fan_in), +1/sqrt(fan_in)) kept (the VampPrior code's he_init
#: sets only the weights).
BIASES = ("zero", "default")


def check_scheme(scheme: object, bias: object = "zero") -> str:
    require(
        scheme in SCHEMES,
        f"model.init must be one of {', '.join(SCHEMES)}, got {scheme!r}",
    )
    require(
        bias in BIASES,
        f"model.init_bias must be one of {', '.join(BIASES)}, got {bias!r}",
    )
    return scheme


def fans(weight) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight (out, in, *kernel) as torch.nn.init counts them."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def initialise(module: nn.Module, scheme: str, bias: str = "zero") -> None:
    """Re-initialise the weights (and, with bias=`zero`, zero the biases) of every layer in
    `module` per `scheme`."""
    check_scheme(scheme, bias)
    if scheme == "default":
        return
    for layer in module.modules():
        if not isinstance(layer, LAYERS):
            continue
        fan_in, fan_out = fans(layer.weight)
        fan = fan_in if scheme.startswith("he") else (fan_in + fan_out) / 2
        std = math.sqrt(1.0 / fan)  # Var W = 1 / fan: 2 / (in + out) or, with the gain, 2 / in
        if scheme.startswith("he"):
            std *= math.sqrt(2.0)
        if scheme.endswith("uniform"):
            nn.init.uniform_(layer.weight, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
        else:
            nn.init.normal_(layer.weight, 0.0, std)
        if layer.bias is not None and bias == "zero":
            nn.init.zeros_(layer.bias)
