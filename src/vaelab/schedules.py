"""Learning-rate schedules, as callables for torch.optim.lr_scheduler.LambdaLR (per epoch).

StageDecay is the schedule of Burda, Grosse & Salakhutdinov (2015), Sec. 5: training runs in
stages i = 0..n_stages-1 of base^i passes each (3^i: 1, 3, 9, ... epochs, 3280 in all for 8
stages), with learning rate lr0 * 10^(-i/7) in stage i.
"""

from __future__ import annotations

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
