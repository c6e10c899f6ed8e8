"""The config's schema (run/schema.py): each section's dataclass states its fields and types, and the shipped
YAML files agree with it; a word where a section declares a number or a flag is refused in one line naming the
field, for every such field; the defaults live in the YAML alone."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from saelab.errors import ConfigError
from saelab.run.compose import CONF_DIR, compose_run_config
from saelab.run.l0_control import L0ControlConfig
from saelab.run.schema import (
    DataSection,
    EvalSection,
    ModelSection,
    OptimSection,
    PathsSection,
    RunSection,
    TrainerSection,
    check_run_config,
)
from saelab.sections import read_section

SECTIONS = {"": RunSection, "l0_control": L0ControlConfig, "model": ModelSection, "data": DataSection,
            "optim": OptimSection, "eval": EvalSection, "trainer": TrainerSection, "paths": PathsSection}
CLOSED = ("model", "optim", "eval", "paths", "l0_control")  # sections holding nothing but their class's fields


def _kind(hint) -> str | None:
    """'bool' or 'number' for a flag or number annotation (Optional or not), else None: read from typing."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if args == [bool]:
        return "bool"
    return "number" if all(a in (int, float) for a in args) else None


def _typed_fields():
    for prefix, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            kind = _kind(hint)
            if kind:
                yield f"{prefix}.{name}" if prefix else name, kind


@pytest.mark.parametrize("group", CLOSED[:3])
def test_every_option_of_a_closed_section_holds_exactly_its_class_fields(group):
    """Each YAML option of model/optim/eval names every field of its class and no other (no undeclared knob)."""
    cls = SECTIONS[group]
    names = {f.name for f in dataclasses.fields(cls)}
    for file in sorted((CONF_DIR / group).glob("*.yaml")):
        keys = set(OmegaConf.load(file)) - {"defaults"}
        assert keys == names, (file.name, keys ^ names)


def test_the_composed_default_config_reads_into_every_section():
    cfg = compose_run_config([])
    for prefix, cls in SECTIONS.items():
        section = cfg if not prefix else cfg[prefix]
        read_section(prefix, cls, section, passthrough=prefix in ("", "data", "trainer"))


@pytest.mark.parametrize(("field", "kind"), list(_typed_fields()))
def test_a_word_where_the_schema_declares_a_number_or_a_flag_is_refused_naming_the_field(field, kind):
    cfg = compose_run_config([f"++{field}=abc"])
    with pytest.raises(ConfigError) as err:
        check_run_config(cfg)
    expected = "true or false" if kind == "bool" else ("an integer" if field.endswith("seed") else "a number")
    assert str(err.value).startswith(f"{field}='abc' is not allowed: expected {expected}")


def test_a_schema_field_has_no_default_of_its_own():
    """Defaults live in the YAML files (one place); Lightning's own num_nodes default is the one exception, for the
    trainer options that do not set it."""
    for cls in (RunSection, ModelSection, DataSection, OptimSection, EvalSection, TrainerSection, PathsSection):
        with_default = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
        assert with_default == (["num_nodes"] if cls is TrainerSection else []), cls.__name__


def test_an_unknown_key_in_a_closed_section_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"^optim\.momentum=0\.9 is not allowed: expected a field of betas, fused"):
        read_section("optim", OptimSection, {**compose_run_config([]).optim, "momentum": 0.9})
