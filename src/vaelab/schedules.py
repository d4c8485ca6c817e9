"""Learning-rate schedules.

StageDecay (a callable for torch.optim.lr_scheduler.LambdaLR, per epoch) is the schedule of
Burda, Grosse & Salakhutdinov (2015), Sec. 5: training runs in stages i = 0..n_stages-1 of
base^i passes each (3^i: 1, 3, 9, ... epochs, 3280 in all for 8 stages), with learning rate
lr0 * 10^(-i/7) in stage i.

TimeCosine is a cosine decay over a wall-clock budget (trainer.max_time) instead of a number of
epochs, for presets defined by their training time.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from vaelab.errors import require, require_int, require_number


class StageDecay:
    """lr factor at an epoch: decay ** (-stage / decay_stages), stage i lasting base**i epochs.

    A class, not a lambda, so LambdaLR can save and restore it in a checkpoint.
    """

    def __init__(
        self, base: int = 3, n_stages: int = 8, decay: float = 10.0, decay_stages: float = 7.0
    ) -> None:
        require_int("scheduler.lr_lambda.base", base, 2)
        require_int("scheduler.lr_lambda.n_stages", n_stages, 1)
        require_number("scheduler.lr_lambda.decay", decay, 1)
        require(
            decay_stages > 0, f"scheduler.lr_lambda.decay_stages must be > 0, got {decay_stages}"
        )
        self.base = base
        self.n_stages = n_stages
        self.decay = decay
        self.decay_stages = decay_stages

    def stage(self, epoch: int) -> int:
        """i such that epoch lies in [sum_{j<i} base^j, sum_{j<=i} base^j), capped at the last."""
        stage, end = 0, 1
        while epoch >= end and stage < self.n_stages - 1:
            stage += 1
            end += self.base**stage
        return stage

    @property
    def total_epochs(self) -> int:
        return sum(self.base**i for i in range(self.n_stages))

    def __call__(self, epoch: int) -> float:
        return self.decay ** (-self.stage(epoch) / self.decay_stages)


def budget_seconds(budget: object) -> float:
    """Seconds in a duration given as Lightning's trainer.max_time accepts it: "DD:HH:MM:SS", a
    dict of timedelta fields ({minutes: 20}), or a number of seconds."""
    seconds: float | None = None
    if isinstance(budget, str):
        parts = budget.split(":")
        if len(parts) == 4 and all(p.strip().isdigit() for p in parts):
            days, hours, minutes, secs = (int(p) for p in parts)
            seconds = timedelta(
                days=days, hours=hours, minutes=minutes, seconds=secs
            ).total_seconds()
    elif isinstance(budget, int | float) and not isinstance(budget, bool):
        seconds = float(budget)
    elif hasattr(budget, "items"):
        try:
            seconds = timedelta(**dict(budget.items())).total_seconds()
        except TypeError:
            seconds = None
    require(
        seconds is not None and seconds > 0,
        f'scheduler.budget must be a positive duration ("DD:HH:MM:SS", e.g. the run\'s '
        f"trainer.max_time, or seconds), got {budget!r}",
    )
    return seconds


class TimeCosine(LRScheduler):
    """Cosine decay of the learning rate over a wall-clock budget:
    lr = base_lr * 0.5 * (1 + cos(pi * min(t / budget, 1))), t the seconds of training so far,
    read at each scheduler step (every epoch). For a preset defined by its training time
    (trainer.max_time): the decay ends at 0 when the budget does, on a fast machine or a slow
    one, where a cosine over a fixed number of epochs stops half-way down on a slower machine
    and idles at 0 on a faster one. The price is that the schedule, and so the result, depends
    on the machine's speed. t is kept in the scheduler's state, so a resumed run continues the
    curve (the time between the interruption and the resumption does not count).
    """

    def __init__(self, optimizer: Optimizer, budget: object, last_epoch: int = -1) -> None:
        self.budget_s = budget_seconds(budget)
        self.elapsed_s = 0.0
        self._clock: float | None = None
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        now = time.monotonic()
        if self._clock is not None:
            self.elapsed_s += now - self._clock
        self._clock = now
        super().step()

    def get_lr(self) -> list[float]:
        fraction = min(self.elapsed_s / self.budget_s, 1.0)
        return [base * 0.5 * (1.0 + math.cos(math.pi * fraction)) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_clock", None)  # a monotonic clock reading means nothing in another process
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._clock = time.monotonic()  # the resumed run's time counts from now
