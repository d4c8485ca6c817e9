"""`last.ckpt`: the state to resume from, kept fresh.

Written every `every_n_train_steps` optimizer steps, at the end of every epoch (after
validation), and when the run is stopped from outside: SIGTERM (what a cluster scheduler sends
before pre-emption) or Ctrl-C. Lightning turns SIGTERM into a clean stop at the next batch
boundary; Ctrl-C (SIGINT) is routed through the same path, so a stop never lands in the middle
of an optimizer step (a second Ctrl-C stops at once). Each write goes to a temporary file that is
renamed into place, and weights that are not finite are never written (VAEModule refuses), so
`last.ckpt` is always the last good state. `resume=<run dir>` continues from it.

On a SLURM cluster the requeue signals (SIGUSR2 from Hydra's submitit launcher
`signal_delay_s` before the time limit, SIGUSR1 from an sbatch `--signal`, either from
`scancel --signal`) are caught the same way: `last.ckpt` is written at the next batch boundary
(after validation at an epoch's end), then the launcher's handler for that signal requeues the
job and exits (submitit), or without one `scontrol requeue` does; the requeued job continues
from that checkpoint in the same run dir (vaelab.train, `SLURM_RESTART_COUNT`). Lightning's own
SLURM handler, which saves inside the signal handler, wherever the step is, is not installed.

What survives a kill -9: the last checkpoint, and every TensorBoard point logged before it
(Lightning flushes the logger after each logging step; a resumed run drops the points logged
after its checkpoint and logs them again). The exception is the training metrics of the batch
whose end wrote a mid-epoch checkpoint: Lightning logs them just after the callbacks run, so a
kill in those few milliseconds loses that one point of the training curves.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vaelab.errors import private_api, require

log = logging.getLogger(__name__)
LAST = "last.ckpt"
#: What SLURM sends before a time limit or pre-emption: SIGUSR2 for submitit, SIGUSR1 for sbatch.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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
        self._launcher_handlers: dict = {}  # SLURM requeue signal -> the handler ours replaced
        self._requeue_signal: tuple | None = None  # (signum, frame) of a pending requeue
        self._saved_for_requeue = False  # last.ckpt holds the state to requeue from
        self._requeued = False  # the job was handed to its requeue

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch-end save follows validation; a checkpoint from between the two would
            # resume without that validation (and not bit-exactly): the epoch end saves instead.
            return
        requeue = self._requeue_pending(trainer)
        every = self.every_n_train_steps
        if requeue or (every and trainer.global_step % every == 0):
            self.save(trainer)
        # The requeue waits for the next batch: Lightning logs this batch's training metrics
        # after the callbacks, and they belong to the curve up to the checkpoint.
        self._saved_for_requeue = requeue

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = -1  # the epoch counter moved on: write even at the same step
        self.save(trainer)
        self._saved_for_requeue = self._requeue_pending(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self._saved_for_requeue:
            self._saved_for_requeue = False
            self._requeue(trainer)

    def _requeue_pending(self, trainer: L.Trainer) -> bool:
        """Whether a requeue signal came; under DDP, whether it came to any process, so that
        all of them save (a collective operation) at the same step."""
        if not self._launcher_handlers:  # not under SLURM
            return False
        pending = self._requeue_signal is not None
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        return pending

    def _requeue(self, trainer: L.Trainer) -> None:
        """After the save, before the next batch: hand the requeue signal to the launcher's
        handler (submitit's requeues the job and exits this process), or requeue with
        scontrol."""
        signum, frame = self._requeue_signal or (signal.SIGUSR2, None)
        handler = self._launcher_handlers.get(signum)
        self._restore_signals()
        self._requeued = True  # last.ckpt is the state to continue from: keep it as it is
        log.warning(
            "requeue signal: checkpoint saved at step %d (%s); requeuing the job",
            trainer.global_step,
            self.path,
        )
        if callable(handler):
            handler(signum, frame)
            return
        if trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        trainer.should_stop = True

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
            return
        if "SLURM_JOB_ID" not in os.environ:
            return

        def on_requeue_signal(signum, frame) -> None:
            self._requeue_signal = (signum, frame)  # acted on at the next batch boundary

        # Installed before Lightning registers its handlers (after on_fit_start), which then
        # leaves a signal that has one alone.
        for requeue_signal in REQUEUE_SIGNALS:
            self._launcher_handlers[requeue_signal] = signal.getsignal(requeue_signal)
            signal.signal(requeue_signal, on_requeue_signal)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if self._requeued:
            # The SIGTERM of the requeue: the next batch was already fetched, so a save now
            # would continue one batch too late.
            return
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
        self._restore_signals()

    def _restore_signals(self) -> None:
        for requeue_signal, handler in self._launcher_handlers.items():
            signal.signal(requeue_signal, handler)
        self._launcher_handlers = {}

    def state_dict(self) -> dict[str, int | None]:
        return {"every_n_train_steps": self.every_n_train_steps}
