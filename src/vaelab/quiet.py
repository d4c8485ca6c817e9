"""Silence the library messages that say nothing about the user's run, narrowly.

Each entry names the logger or warning and the message it drops; everything else Lightning and
torch say (the seed, a GPU that is there but unused, why training stopped) still reaches the
terminal. Installed when vaelab is imported, so DDP processes, evaluate.py and notebooks share it.
"""

from __future__ import annotations

import logging
import re
import warnings

from tqdm import tqdm

#: Lightning's rank-zero messages come from one of these loggers (the last one imported sets it).
RANK_ZERO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: (logger, message pattern) pairs dropped; the patterns match the start of the message.
DROPPED_LOG_MESSAGES = (
    # advertisement for a hosted logger, printed by every Trainer
    (RANK_ZERO, r"💡 Tip: "),
    # the accelerators this run does not have (a GPU that is there stays: "GPU available: True")
    (RANK_ZERO, r"GPU available: False"),
    (RANK_ZERO, r"TPU available: False"),
    (RANK_ZERO, r"HPU available: False"),
    # vaelab supplies its own model summary (vaelab.callbacks.ModelSummary)
    (RANK_ZERO, r"Trainer already configured with model summary"),
    # torch's C++ extension helper, imported by torch.compile, on a machine without CUDA
    (("torch.utils.cpp_extension",), r"No CUDA runtime is found"),
)
#: Warnings from library internals that a user cannot act on.
DROPPED_WARNINGS = (
    # Lightning's pytree helper with this torch, on every run
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # on any machine with SLURM installed (every login node), at every run not started by srun
    (r"The `srun` command is available on your system but is not used", UserWarning),
    # every bf16-mixed run (the default on a CPU with native bf16): the summary's size in MB
    # counts 32-bit parameters, which is what bf16-mixed keeps
    (r"Precision bf16-mixed is not supported by the model summary", UserWarning),
)


class BarSafeHandler(logging.StreamHandler):
    """The terminal's log handler (configs/hydra/default.yaml): each record written through
    tqdm, which clears the progress bars first and draws them again after, so a log line never
    lands on a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # as logging.StreamHandler.emit: a failing log call must not stop a run
            self.handleError(record)


class DropMessages(logging.Filter):
    """A logger filter dropping records whose message starts with one of `patterns`."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


#: Loggers that Lightning gives a terminal handler of its own when it is imported before any
#: logging is configured (it then stops them from propagating to the root logger's handlers).
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def install() -> None:
    """Add the filters (idempotent: one filter per logger, however often it is called), and
    write Lightning's own terminal messages through the progress bar (`BarSafeHandler`)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's plain one
                safe = BarSafeHandler(handler.stream)
                safe.setLevel(handler.level)
                safe.setFormatter(handler.formatter)
                logger.removeHandler(handler)
                logger.addHandler(safe)
    by_logger: dict[str, list[str]] = {}
    for names, pattern in DROPPED_LOG_MESSAGES:
        for name in names:
            by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(existing)
        logger.addFilter(DropMessages(patterns))
    for pattern, category in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
