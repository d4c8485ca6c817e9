"""Which `_target_`s a config read back from a run dir or checkpoint may instantiate.

A saved config is untrusted input: `_target_` can name any callable, and torch's namespace alone
holds functions that load and run code (`torch.load`, `torch.hub.load`, ...). So trust goes by
exact name: the classes the project's own configs produce (`PROJECT_TARGETS`, kept equal to the
targets in configs/ by a test), a few harmless classes a user may pick on the command line
(`SAFE_TORCH_CLASSES`), and what the user names in `trusted_targets` for their own extension
package (a package prefix, `mypackage`, or an exact class, `mypackage.priors.MyPrior`). That list
comes from the command line of the evaluation or resume, never from the file being read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vaelab.errors import ConfigError

PROJECT_TARGETS = frozenset(
    {
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.TQDMProgressBar",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "torch.optim.lr_scheduler.LambdaLR",
        "torch.optim.lr_scheduler.ReduceLROnPlateau",
        "torch.nn.ReLU",
        "torch.nn.Tanh",
        "vaelab.callbacks.HParamsLogger",
        "vaelab.callbacks.ImageLogger",
        "vaelab.callbacks.LastCheckpoint",
        "vaelab.checkpoints.SafeCheckpointIO",
        "vaelab.data.FashionMNIST",
        "vaelab.data.ImageDataModule",
        "vaelab.data.MNIST",
        "vaelab.likelihoods.Bernoulli",
        "vaelab.likelihoods.ContinuousBernoulli",
        "vaelab.likelihoods.Gaussian",
        "vaelab.likelihoods.GaussianFixed",
        "vaelab.models.VAE",
        "vaelab.nets.ConvDecoder",
        "vaelab.nets.ConvEncoder",
        "vaelab.nets.MLPDecoder",
        "vaelab.nets.MLPEncoder",
        "vaelab.objectives.Autoencoder",
        "vaelab.objectives.ELBO",
        "vaelab.objectives.IWAE",
        "vaelab.priors.MixtureOfGaussians",
        "vaelab.priors.StandardNormal",
        "vaelab.priors.VampPrior",
        "vaelab.schedules.StageDecay",
        "vaelab.schedules.TimeCosine",
    }
)
#: Classes without side effects that a user may swap in from the command line.
SAFE_TORCH_CLASSES = frozenset(
    f"torch.nn.{name}"
    for name in (
        "ELU",
        "GELU",
        "Identity",
        "LeakyReLU",
        "Mish",
        "SELU",
        "SiLU",
        "Sigmoid",
        "Softplus",
    )
) | frozenset(f"torch.optim.{name}" for name in ("SGD", "RMSprop", "NAdam", "RAdam", "Adamax"))
TRUSTED_TARGETS = PROJECT_TARGETS | SAFE_TORCH_CLASSES


def is_trusted(target: object, extra: Iterable[str] = ()) -> bool:
    if not isinstance(target, str):
        return False
    if target in TRUSTED_TARGETS:
        return True
    return any(target == name or target.startswith(f"{name}.") for name in extra if name)


def check_targets(config: Mapping[str, Any] | list, where: str, extra: Iterable[str] = ()) -> None:
    """Refuse any `_target_` that is not trusted by name (see the module docstring)."""
    extra = [str(name).rstrip(".") for name in extra]
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        if key == "_target_" and not is_trusted(value, extra):
            allowed = f"; or add its package to trusted_targets (now {extra})"
            raise ConfigError(
                f"{where}: refusing to instantiate _target_={value!r}: not one of vaelab's own "
                f"targets{allowed}"
            )
        if isinstance(value, Mapping | list):
            check_targets(value, where, extra)
