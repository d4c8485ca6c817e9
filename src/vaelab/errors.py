"""Errors a user can fix: each message is one line naming the bad value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable


class VaelabError(Exception):
    """Base class: the entry points print these as one line and exit with status 1."""


class ConfigError(VaelabError, ValueError):
    """A config value is out of range or inconsistent with another one."""


class DataError(VaelabError):
    """Dataset files are missing, corrupt, or cannot be downloaded."""


class CheckpointError(VaelabError):
    """A run dir or checkpoint cannot be used (missing, foreign, or mismatched)."""


class NonFiniteError(VaelabError):
    """Training produced NaN or infinite values."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def one_line(error: BaseException | str) -> str:
    """An error's text on one line (library messages often span several)."""
    return " ".join(str(error).split())


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


def require_int(name: str, value: object, minimum: int) -> None:
    """`value` is an integer (not a bool) >= minimum, else a ConfigError naming `name`."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an integer >= {minimum}, got {value!r}",
    )


def require_number(name: str, value: object, minimum: float) -> None:
    """`value` is a real number >= minimum, else a ConfigError naming `name`."""
    require(
        isinstance(value, int | float) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be a number >= {minimum:g}, got {value!r}",
    )


def require_in_range(
    name: str, value: object, low: float, high: float, closed_low: bool, closed_high: bool
) -> None:
    """`value` is a finite real number in the interval, else a ConfigError naming `name`."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    inside = (
        number
        and math.isfinite(value)
        and (value >= low if closed_low else value > low)
        and (value <= high if closed_high else value < high)
    )
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    require(inside, f"{name} must be a number in {interval}, got {value!r}")


def require_betas(name: str, betas: object) -> None:
    """Adam's `betas`: two numbers in [0, 1), else a ConfigError naming `name`."""
    values = list(betas) if isinstance(betas, Iterable) and not isinstance(betas, str) else None
    require(
        values is not None
        and len(values) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in values)
        and all(0 <= b < 1 for b in values),
        f"{name} must be two numbers in [0, 1), got {repr(betas) if values is None else values}",
    )


class LightningAPIError(VaelabError, RuntimeError):
    """A private attribute of Lightning (or torch) that vaelab relies on is gone."""


def private_api(owner: object, name: str, library: str = "lightning"):
    """`getattr(owner, name)` for one of the few private attributes vaelab uses where no public
    route exists; a clear error naming it (and the versions pyproject.toml pins) if a release of
    `library` removed it."""
    try:
        return getattr(owner, name)
    except AttributeError as e:
        raise LightningAPIError(
            f"{type(owner).__name__}.{name} is gone from this {library} release; vaelab relies "
            "on it and is tested with the versions pinned in pyproject.toml"
        ) from e
