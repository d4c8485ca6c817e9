"""Callbacks: side effects (images, reports, guards) that stay out of the LightningModule."""

from vaelab.callbacks.checkpointing import LastCheckpoint
from vaelab.callbacks.disentanglement import DisentanglementLogger
from vaelab.callbacks.hparams import HParamsLogger
from vaelab.callbacks.images import ImageLogger
from vaelab.callbacks.reliability import FiniteGuard, RandomState, reliability_callbacks
from vaelab.callbacks.reporting import MetricsHistory, ModelSummary, ProgressBar
from vaelab.callbacks.step import BitsPerDim, LayerRates, step_callbacks

__all__ = [
    "BitsPerDim",
    "LayerRates",
    "DisentanglementLogger",
    "FiniteGuard",
    "HParamsLogger",
    "ImageLogger",
    "LastCheckpoint",
    "MetricsHistory",
    "ModelSummary",
    "ProgressBar",
    "RandomState",
    "reliability_callbacks",
    "step_callbacks",
]
