"""`last.ckpt`: the state to resume from, kept fresh.

Written every `every_n_train_steps` optimizer steps, at the end of every epoch (after
validation), and when the run is stopped from outside: SIGTERM (what a cluster scheduler sends
before pre-emption) or Ctrl-C. Lightning turns SIGTERM into a clean stop at the next batch
boundary; Ctrl-C (SIGINT) is routed through the same path, so a stop never lands in the middle
of an optimizer step (a second Ctrl-C stops at once). Each write goes to a temporary file that is
renamed into place, and weights that are not finite are never written (VAEModule refuses), so
`last.ckpt` is always the last good state. `resume=<run dir>` continues from it.

What survives a kill -9: the last checkpoint, and every TensorBoard point logged before it
(Lightning flushes the logger after each logging step; a resumed run drops the points logged
after its checkpoint and logs them again). The exception is the training metrics of the batch
whose end wrote a mid-epoch checkpoint: Lightning logs them just after the callbacks run, so a
kill in those few milliseconds loses that one point of the training curves.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vaelab.errors import private_api, require

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """A Checkpoint callback, so Lightning runs it after the other callbacks (ModelCheckpoint
    included): the state it writes holds their final word on the epoch, e.g. the best model."""

    def __init__(self, dirpath: str, every_n_train_steps: int | None = 500) -> None:
        require(
            every_n_train_steps is None or every_n_train_steps >= 1,
            f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}",
        )
        self.path = Path(dirpath) / LAST
        self.every_n_train_steps = every_n_train_steps
        self._previous_sigint = None
        self._saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        every = self.every_n_train_steps
        if not every or trainer.global_step % every or trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch-end save follows validation; a checkpoint from between the two would
            # resume without that validation (and not bit-exactly): the epoch end saves instead.
            return
        self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = -1  # the epoch counter moved on: write even at the same step
        self.save(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own SIGTERM path (stop at the next batch boundary) has no public entry.
        connector = private_api(trainer, "_signal_connector")
        notify = private_api(connector, "_sigterm_notifier_fn")

        def on_sigint(signum, frame) -> None:
            log.warning(
                "Ctrl-C: stopping after this batch and saving a checkpoint "
                "(press again to stop at once)"
            )
            signal.signal(signal.SIGINT, signal.default_int_handler)
            notify(signum, frame)

        try:
            self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (some launchers): keep the default handler
            self._previous_sigint = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException | KeyboardInterrupt):
            self._saved_step = -1
            self.save(trainer)
            log.warning(
                "stopped at step %d; checkpoint saved: %s (continue with resume=<run dir>)",
                trainer.global_step,
                self.path,
            )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def state_dict(self) -> dict[str, int | None]:
        return {"every_n_train_steps": self.every_n_train_steps}
