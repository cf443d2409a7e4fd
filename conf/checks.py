"""Value checks every config dataclass uses; a failure names the key and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message says which key and what is allowed."""


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ConfigError(f"{key}={value!r} must be at least {low}")
        if low is None:
            raise ConfigError(f"{key}={value!r} must be at most {high}")
        raise ConfigError(f"{key}={value!r} must lie in [{low}, {high}]")
