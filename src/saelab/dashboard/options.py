"""The dashboard's command line -> a Plan, checked before any model loads.

Overrides are `key=value` words parsed with OmegaConf.from_dotlist (YAML values: `latents=[3,17,42]`,
`tokens=5e4`). Dashboard options are bare keys (`latents`, `tokens`, ...); `model=<option>` and
`data=<option>` pick a config group as for saelab-train, `model.<field>=...` and `data.<field>=...` change a
field. A run directory supplies its own `.hydra/config.yaml` model and data sections; a bare exported SAE
starts from `model=minilm data=pydocs` with the hook (and context size) from its cfg.json. Anything else is a
ConfigError: one line naming the field and what is allowed, raised before a file is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from saelab.cli.checks import writable_problem
from saelab.errors import ConfigError
from saelab.run.compose import CONF_DIR, compose_run_config
from saelab.saes.saelens_format import CONFIG_FILE, read_sae_dir

SAE_CONFIG = CONFIG_FILE
RUN_CONFIG = Path(".hydra") / "config.yaml"
GROUPS = ("model", "data")  # the config groups a dashboard reads; everything else of a run is irrelevant here
BARE_DEFAULTS = {"model": "minilm", "data": "pydocs"}  # the offline default, for an SAE without its run
TEXT_SOURCES = ("pydocs", "text_files", "hf")

DEFAULTS: dict[str, Any] = {
    "latents": "top:50+random:20",  # which latents get a page (see parse_latents)
    "tokens": 50_000,  # held-out real-text tokens to encode (whole windows, in corpus order)
    "contexts": 10,  # top-activating windows shown per latent
    "window": 10,  # tokens shown either side of a context's maximum
    "logit_tokens": 10,  # tokens listed whose logits the decoder row raises / lowers most (causal LMs)
    "bins": 30,  # bins of each latent's activation histogram
    "seed": 0,  # the random:N draw
    "batch_size": 4096,  # activations per SAE encode (memory: batch_size x d_sae x 4 bytes)
    "out": None,  # output folder (default: <run dir>/dashboard)
}
OPTION_HELP = ", ".join(DEFAULTS) + ", model=<option>, model.<field>, data=<option>, data.<field>"
LATENTS_ALLOWED = ("top:N (most frequently firing), random:N, a latent id or a list of ids such as [3,17,42], "
                   "joined with + (e.g. top:50+random:20)")


@dataclass(frozen=True)
class LatentSpec:
    """Which latents get a page: the `top` most frequently firing, `random` others, and `listed` ids."""

    top: int = 0
    random: int = 0
    listed: tuple[int, ...] = ()


@dataclass(frozen=True)
class Options:
    latents: LatentSpec
    tokens: int
    contexts: int
    window: int
    logit_tokens: int
    bins: int
    seed: int
    batch_size: int


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
    def hook(self) -> str:
        return str(self.model.hook)


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


# -- option values --------------------------------------------------------------------------------------------
def _int(name: str, value: Any, minimum: int) -> int:
    """An integer option; `5e4` (YAML float or string) counts as 50000."""
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
        raise ConfigError(name, value, f"an integer >= {minimum}")
    if int(number) < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")
    return int(number)


def parse_latents(value: Any) -> LatentSpec:
    """`top:50+random:20`, `random:5`, `12`, `[3,17,42]` or `3+17+top:5` -> LatentSpec."""
    terms: list[Any]
    if isinstance(value, (list, tuple, ListConfig)):
        terms = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        terms = [value]
    elif isinstance(value, str):
        terms = [t.strip() for t in re.split(r"[+,]", re.sub(r"[\[\]\s]", "", value))]
    else:
        raise ConfigError("latents", value, LATENTS_ALLOWED)
    top = rand = 0
    listed: list[int] = []
    for term in terms:
        if isinstance(term, int) and not isinstance(term, bool) and term >= 0:
            listed.append(term)
            continue
        match = re.fullmatch(r"(top|random):(\d+)|(\d+)", str(term))
        if match is None or (match.group(2) is not None and int(match.group(2)) == 0):
            raise ConfigError("latents", value if not isinstance(value, ListConfig) else list(value),
                              LATENTS_ALLOWED)
        if match.group(3) is not None:
            listed.append(int(match.group(3)))
        elif match.group(1) == "top":
            top += int(match.group(2))
        else:
            rand += int(match.group(2))
    return LatentSpec(top, rand, tuple(dict.fromkeys(listed)))


def check_latents(spec: LatentSpec, d_sae: int) -> None:
    bad = [i for i in spec.listed if i >= d_sae]
    if bad:
        raise ConfigError("latents", bad[0] if len(bad) == 1 else bad,
                          f"latent ids in 0..{d_sae - 1} (this SAE has d_sae {d_sae})")


def parse_options(values: Mapping[str, Any]) -> Options:
    merged = {**DEFAULTS, **values}
    return Options(
        latents=parse_latents(merged["latents"]),
        tokens=_int("tokens", merged["tokens"], 1),
        contexts=_int("contexts", merged["contexts"], 1),
        window=_int("window", merged["window"], 0),
        logit_tokens=_int("logit_tokens", merged["logit_tokens"], 1),
        bins=_int("bins", merged["bins"], 1),
        seed=_int("seed", merged["seed"], 0),
        batch_size=_int("batch_size", merged["batch_size"], 1),
    )


# -- the command line -----------------------------------------------------------------------------------------
def split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """(group choices {group: option}, dashboard options {key: value}, field overrides `group.x=v`)."""
    choices: dict[str, str] = {}
    fields: list[str] = []
    option_words: list[str] = []
    for word in overrides:
        if "=" not in word:
            raise ConfigError("option", word, f"key=value, with key one of {OPTION_HELP}")
        key, value = word.split("=", 1)
        key = key.strip()
        if key in GROUPS:
            choices[key] = value.strip()
        elif key.lstrip("+").split(".", 1)[0] in GROUPS and "." in key:
            fields.append(word)
        elif key in DEFAULTS:
            option_words.append(word)
        else:
            raise ConfigError(key, value, f"one of the options {OPTION_HELP}")
    try:
        options = OmegaConf.to_container(OmegaConf.from_dotlist(option_words)) if option_words else {}
    except Exception as err:  # a value YAML cannot read, e.g. latents=[3,
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError("option", " ".join(option_words), f"key=value with a YAML value ({first})") from None
    return choices, dict(options), fields


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
    hook = sae_field(sae_cfg, "hook_name")
    if hook and "model.hook" not in touched:
        model.hook = str(hook)
    model.hooks = None
    if run_dir is None:
        for key in ("context_size", "prepend_bos"):
            value = sae_field(sae_cfg, key)
            if value is not None and f"data.{key}" not in touched:
                data[key] = value
    if str(data.get("source")) not in TEXT_SOURCES or sae_field(sae_cfg, "model_name") == "synthetic":
        raise ConfigError("data", str(data.get("source")),
                          f"a text source ({', '.join(TEXT_SOURCES)}): a dashboard shows contexts of real text")
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
