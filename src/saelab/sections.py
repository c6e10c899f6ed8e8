"""How a config section becomes its dataclass: the one reader every section of the schema goes through.

A section's dataclass states its fields and their types (its annotations) and its checks (`validate`); the YAML
files under saelab/conf hold each field's default and document it. `read_section` refuses a key the class does
not have, a word where the class has a number or a flag, and then runs the class's own checks, each in one
line naming the field (ConfigError).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from saelab.errors import ConfigError, check_bool, check_known_fields

T = TypeVar("T")


def _kinds(hint: Any) -> set[type]:
    """The plain types an annotation admits (None left out): int | None -> {int}."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return {t for arg in typing.get_args(hint) for t in _kinds(arg)}
    origin = typing.get_origin(hint)
    if hint is type(None):
        return set()
    return {origin or hint} if isinstance(origin or hint, type) else {object}


def typed_value(field: str, value: Any, hint: Any, *, integral_floats: bool = False) -> Any:
    """`value` checked against its annotation where that is a flag or a number (others are the class's checks):
    a flag must be true or false, a number a number. `Annotated[int, "an integer"]` words what a number field
    expects and refuses a fraction there (a seed). `integral_floats`: 2e6 (YAML's and the command line's float)
    becomes 2000000 for an int field (the variants' sections)."""
    if value is None:
        return value
    expected = "a number"
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        expected = next((e for e in extras if isinstance(e, str)), expected)
    kinds = _kinds(hint)
    if kinds == {bool}:
        check_bool(field, value)
    elif kinds and kinds <= {int, float}:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, value, expected)
        if kinds == {int} and isinstance(value, float):
            if not value.is_integer() and expected != "a number":  # 1.5 where an integer is worded
                raise ConfigError(field, value, expected)
            if integral_floats and value.is_integer():
                return int(value)
    return value


def read_section(prefix: str, cls: type[T], section: Mapping[str, Any] | None, *, passthrough: bool = False) -> T:
    """The dataclass `cls` from a config section: unknown keys refused (kept out when `passthrough`: a section
    handed on to a library that checks its own), typed fields checked, then `cls.validate()` if it has one.
    `prefix` names the section in errors ("" for the top level)."""
    names = [f.name for f in dataclasses.fields(cls)]
    section = section if section is not None else {}
    if passthrough:  # only the declared fields are read (the rest may name what exists only in a run)
        given = {name: section[name] for name in names if name in section}
    else:
        given = dict(section)
        check_known_fields(prefix, given, names)
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {name: typed_value(f"{prefix}.{name}" if prefix else name, given[name], hints[name])
              for name in names if name in given}
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance
