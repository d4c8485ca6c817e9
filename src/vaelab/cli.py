"""What the thin entry points share: one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from vaelab.errors import find_user_error

T = TypeVar("T")


def report_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Print a user error (VaelabError, also when Hydra wrapped it) as one line, exit 1.

    Anything else is a bug and keeps its traceback.
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
            sys.exit(1)

    return wrapped
