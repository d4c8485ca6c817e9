"""What the thin entry points share: one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from vaelab.errors import find_user_error

T = TypeVar("T")


def report_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Print a user error (VaelabError, also when Hydra wrapped it) as one line, exit 1.

    Anything else is a bug and keeps its traceback. Inside a multirun the error is re-raised
    after printing, so that Hydra marks the run failed and carries on with the sweep.
    """

    @functools.wraps(task)
    def wrapped(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except Exception as e:
            user_error = find_user_error(e)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                # In a sweep, let Hydra record this run as failed and go on with the others.
                raise user_error from None
            sys.exit(1)

    return wrapped
