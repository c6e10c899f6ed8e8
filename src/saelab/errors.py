"""One exception type for bad input, so the CLI can print it as one line and exit non-zero."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config field holds a value that is not allowed. The message names the field and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str | Iterable[Any]):
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: expected {allowed}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(field, value, choices)


def check_positive(field: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(field, value, f"a {kind}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(field, value, f"a {'non-negative' if allow_zero else 'positive'} {kind}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, value, "true or false")


def cli_error_line(err: BaseException) -> str | None:
    """The one line a command prints for bad input (then exits 2): a ConfigError's message, or the first line of
    a Hydra or OmegaConf error (a composition or interpolation failure, which names the key); None otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, ConfigError):
        return f"error: {err}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return f"error: {str(err).splitlines()[0]}"
    return None


def bad_input_exit(err: Exception) -> int:
    """In a command's `except Exception`: print the one line of bad input (cli_error_line) and return the exit
    status 2; anything else is raised again, with its traceback."""
    line = cli_error_line(err)
    if line is None:
        raise err
    print(line, file=sys.stderr)
    return 2


def check_count(field: str, value: Any) -> int:
    """A positive integer; 2e6 from the command line counts (an integral float)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_positive(field, value, integer=True)
    return value


def check_integer(field: str, value: Any) -> None:
    """An integer of any sign (a seed); 2e6-style integral floats are integers."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(field, value, "an integer")


def check_known_fields(prefix: str, given: Mapping[str, Any], known: Iterable[str]) -> None:
    """A config section read into a dataclass: a key it does not have is refused by name (a typo would otherwise be
    dropped silently or fail as a TypeError)."""
    names = sorted(known)
    for key in sorted(given):
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", given[key], "a field of " + ", ".join(names))
