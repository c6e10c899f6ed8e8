"""The dashboard's Plan: the SAE directory, its run's model and data sections and the checked Options, resolved
before any model loads (dashboard/cli.py makes it, collect.py and render.py follow it).

A run directory supplies its own `.hydra/config.yaml` model and data sections; a bare exported SAE starts from
`model=minilm data=pydocs` with the hook (and context size) from its cfg.json. `model=<option>`/`data=<option>`
recompose a section as saelab-train would, and `model.<field>=...`/`data.<field>=...` change a field (options.py
sorts the words). Anything else is a ConfigError: one line naming the field and what is allowed, raised before a
file is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saelab.cli.checks import writable_problem
from saelab.dashboard.options import GROUPS, Options, check_latents, parse_options, split_overrides
from saelab.data.sources import TextSource, build_source
from saelab.errors import ConfigError
from saelab.run.compose import CONF_DIR, compose_run_config
from saelab.saes.saelens_format import CONFIG_FILE, read_sae_dir
from saelab.sites import Sites

SAE_CONFIG = CONFIG_FILE
RUN_CONFIG = Path(".hydra") / "config.yaml"
BARE_DEFAULTS = {"model": "minilm", "data": "pydocs"}  # the offline default, for an SAE without its run


@dataclass
class Plan:
    """Everything a dashboard build needs, resolved and checked; nothing loaded or written yet."""

    source: Path  # the directory given on the command line
    run_dir: Path | None  # the training run (config, metrics.json); None for a bare export
    sae_dir: Path  # holds cfg.json + sae_weights.safetensors
    out_dir: Path
    sae_cfg: dict[str, Any]
    model: DictConfig  # resolved, detached model section (model.hook is the SAE's hook)
    data: DictConfig  # resolved, detached data section (data.cache off: the dashboard reads text, not caches)
    options: Options
    metrics: dict[str, Any] | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def sites(self) -> Sites:
        """The hooks the SAE reads (a crosscoder's several), and a cross-layer transcoder's MLP outputs."""
        targets = self.model.get("target_hook")
        return Sites.of(self.model.hook, list(targets) if isinstance(targets, Sequence) and not isinstance(
            targets, str) else None)

    @property
    def hook(self) -> str:
        return self.sites.hook


# -- the directory --------------------------------------------------------------------------------------------
def locate(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(sae_dir, run_dir or None) for a run directory or an exported SAE directory."""
    given = Path(path).expanduser()
    allowed = "a run directory (holding sae/cfg.json) or an exported SAE directory (holding cfg.json)"
    if not given.is_dir():
        raise ConfigError("path", str(path), allowed)
    if (given / "sae" / SAE_CONFIG).is_file():
        return given / "sae", given if (given / RUN_CONFIG).is_file() else None
    if (given / SAE_CONFIG).is_file():  # an export; its run's config when it sits in a run directory
        return given, given.parent if (given.parent / RUN_CONFIG).is_file() else None
    raise ConfigError("path", str(path), allowed)


def read_sae_config(sae_dir: Path) -> dict[str, Any]:
    return read_sae_dir(sae_dir, field="path")


def sae_field(cfg: Mapping[str, Any], key: str) -> Any:
    """A field SAELens keeps at the top level in older exports and under `metadata` in newer ones."""
    return cfg.get(key, (cfg.get("metadata") or {}).get(key))


def trained_without_model(sae_cfg: Mapping[str, Any]) -> bool:
    """Whether the SAE was trained on activations no model made (data=synthetic): a dashboard of it would show
    text the SAE never read. Its export says so in `has_model` (run/results.export_metadata)."""
    has_model = sae_field(sae_cfg, "has_model")
    if has_model is not None:
        return not has_model
    # An export from a saelab before `has_model`, or from SAELens, lacks the field: saelab then named a source
    # without a model as both model_name and dataset_path (an export of a model names the two apart).
    return sae_field(sae_cfg, "model_name") == sae_field(sae_cfg, "dataset_path")


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose_sections(choices: Mapping[str, str]) -> DictConfig:
    """The train config composed with these group choices (as saelab-train would), for its model/data."""

    for group, choice in choices.items():
        if choice not in _group_options(group):
            raise ConfigError(group, choice, _group_options(group))
    return compose_run_config([f"{g}={c}" for g, c in choices.items()])


def _resolved(cfg: DictConfig, group: str) -> DictConfig:
    """One section with its interpolations (${seed}, ${package_model_path:...}) resolved, detached."""
    import saelab.data.model  # noqa: F401  registers the package_model_path resolver

    return OmegaConf.create(OmegaConf.to_container(cfg[group], resolve=True))


def _has_field(section: DictConfig, dotted: str) -> bool:
    """Whether `a.b` names a field, a mandatory `???` one included (which `in` and select treat as absent)."""
    node: Any = section
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) and part in list(node.keys()) else None
    return isinstance(node, DictConfig) and last in list(node.keys())


def _apply_fields(sections: dict[str, DictConfig], fields: Sequence[str]) -> set[str]:
    """Apply `group.field=value` overrides; `+group.field=value` may add a field. Returns the keys set."""
    touched = set()
    for word in fields:
        key, value = word.split("=", 1)
        add = key.startswith("+")
        group, name = key.lstrip("+").split(".", 1)
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        section = sections[group]
        if not add and not _has_field(section, name):
            raise ConfigError(key, parsed, f"a field of {group}: {', '.join(map(str, section.keys()))}")
        OmegaConf.update(section, name, parsed, merge=True)
        touched.add(f"{group}.{name}")
    return touched


def _writable(out_dir: Path) -> None:
    problem = writable_problem(out_dir.absolute())
    if problem:
        raise ConfigError("out", str(out_dir), f"a directory saelab can create and write to ({problem})")


def make_plan(path: str | os.PathLike, overrides: Sequence[str]) -> Plan:
    """Check the command line and resolve the configs; loads no model, writes nothing."""
    sae_dir, run_dir = locate(path)
    sae_cfg = read_sae_config(sae_dir)
    choices, option_values, fields = split_overrides(overrides)
    options = parse_options(option_values)
    check_latents(options.latents, int(sae_cfg["d_sae"]))

    if run_dir is not None:
        base = OmegaConf.load(run_dir / RUN_CONFIG)
        missing = [g for g in GROUPS if g not in base and g not in choices]
        if missing:
            raise ConfigError("path", str(run_dir / RUN_CONFIG), f"a run config with a {missing[0]} section")
        sections = {g: _resolved(base, g) for g in GROUPS if g not in choices}
        if choices:
            composed = _compose_sections(choices)
            sections |= {g: _resolved(composed, g) for g in choices}
    else:
        composed = _compose_sections({**BARE_DEFAULTS, **choices})
        sections = {g: _resolved(composed, g) for g in GROUPS}
    touched = _apply_fields(sections, fields)
    model, data = sections["model"], sections["data"]

    # The SAE's own record of where it reads beats the config's defaults, unless the command line says otherwise.
    hook = sae_field(sae_cfg, "hook_names") or sae_field(sae_cfg, "hook_name")  # a crosscoder's: its sites
    if hook and "model.hook" not in touched:
        model.hook = list(hook) if isinstance(hook, list) else str(hook)
    outputs = sae_field(sae_cfg, "hook_names_out")  # a cross-layer transcoder's MLP outputs
    if outputs and "model.target_hook" not in touched:
        model.target_hook = list(outputs)
    diff_with = sae_field(sae_cfg, "diff_with")  # a diffing crosscoder's second model
    if diff_with and "model.diff_with" not in touched:
        model.diff_with = str(diff_with)
    if run_dir is None:
        for key in ("context_size", "prepend_bos"):
            value = sae_field(sae_cfg, key)
            if value is not None and f"data.{key}" not in touched:
                data[key] = value
    source = build_source(data)
    if not isinstance(source, TextSource) or trained_without_model(sae_cfg):
        raise ConfigError("data", source.name, "a text source (one read through a model): a dashboard shows "
                          "contexts of real text")
    data.cache = "off"  # held-out text is read and encoded here; no activation cache is made or read

    out = option_values.get("out")
    out_dir = Path(str(out)).expanduser() if out else (run_dir or sae_dir) / "dashboard"
    _writable(out_dir)
    metrics = None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except ValueError:
            metrics = None
    return Plan(Path(path), run_dir, sae_dir, out_dir, sae_cfg, model, data, options, metrics, list(overrides))
