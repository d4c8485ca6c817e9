"""Errors a user can fix: each message is one line naming the bad value and what is allowed."""

from __future__ import annotations


class VaelabError(Exception):
    """Base class: the entry points print these as one line and exit with status 1."""


class ConfigError(VaelabError, ValueError):
    """A config value is out of range or inconsistent with another one."""


class DataError(VaelabError):
    """Dataset files are missing, corrupt, or cannot be downloaded."""


class CheckpointError(VaelabError):
    """A run dir or checkpoint cannot be used (missing, foreign, or mismatched)."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def find_user_error(exc: BaseException) -> VaelabError | None:
    """The VaelabError behind exc, following the cause chain (Hydra wraps what it instantiates)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, VaelabError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
