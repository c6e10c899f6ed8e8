"""Up-front validation of a run's config: cheap checks that fail before any model is loaded."""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from saelab.data.cache import cache_root
from saelab.data.model import check_model_config
from saelab.data.normalize import METHODS
from saelab.data.synthetic import SyntheticSpec
from saelab.errors import ConfigError, check_bool, check_choice, check_positive
from saelab.run.compose import CONF_DIR
from saelab.run.module import NAN_POLICIES
from saelab.run.precision import SAELAB_PRECISIONS

SOURCES = ("pydocs", "text_files", "hf", "synthetic")
# What lightning.pytorch.Trainer(precision=...) accepts (its _PRECISION_INPUT), read from Lightning when possible.
_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
               "transformer-engine-float16")
_PRECISION_ALIASES = ("64", "32", "16", "bf16", 64, 32, 16)


def _int(field: str, value) -> int:
    """Accept 2e6 from the CLI for an integer field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_positive(field, value, integer=True)
    return value


def lightning_precisions() -> tuple:
    """Every value Lightning's Trainer accepts for `precision` (full names first, then the aliases)."""
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:  # a Lightning without this private name: the list above (Lightning 2.x)
        return _PRECISIONS + _PRECISION_ALIASES
    values = [v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal)]
    full = [v for v in _PRECISIONS if v in values]
    full += [v for v in values if isinstance(v, str) and "-" in v and v not in full]
    return tuple(full) + tuple(v for v in values if v not in full)


def check_precision(value) -> None:
    allowed = SAELAB_PRECISIONS + lightning_precisions()
    if value is None:  # Lightning's default
        return
    if isinstance(value, bool) or value not in allowed:
        full = ", ".join(str(v) for v in allowed if isinstance(v, str) and ("-" in v or v in SAELAB_PRECISIONS))
        aliases = ", ".join(dict.fromkeys(str(v) for v in allowed if not (isinstance(v, str) and "-" in v)))
        raise ConfigError("trainer.precision", value, f"one of {full} (or the aliases {aliases})")


def check_devices(value) -> None:
    """Lightning's `devices`: "auto", a positive count, -1 (all), "0,1"-style indices, or a list of indices."""
    if isinstance(value, ListConfig):
        value = list(value)
    ok = (
        value == "auto"
        or (isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1))
        or (isinstance(value, str) and bool(re.fullmatch(r"\s*(-1|[1-9]\d*|\d+\s*(,\s*\d+\s*)*,\s*(\d+)?)\s*", value)))
        or (isinstance(value, list) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    )
    if not ok:
        raise ConfigError("trainer.devices", value,
                          "a positive integer, -1 (all), 'auto', or a non-empty list of device indices")


def check_ckpt_path(value) -> None:
    if value is None or value == "last":
        return
    if not isinstance(value, str) or not Path(value).expanduser().is_file():
        raise ConfigError("ckpt_path", value, 'null, "last", or an existing checkpoint file')


def check_transcoder(cfg: DictConfig) -> None:
    """model.target_hook makes a transcoder: it needs a model (not data=synthetic) and a hook other than its
    input; sae.d_out is then filled in from the model (saelab.run.training), and is null for an SAE."""
    target = cfg.model.get("target_hook")
    if target is None:
        if cfg.sae.get("d_out") is not None:
            raise ConfigError("sae.d_out", cfg.sae.d_out, "null for an SAE (a transcoder's output width comes with "
                              "model.target_hook)")
        return
    if cfg.data.source == "synthetic":
        raise ConfigError("model.target_hook", target, "null with data=synthetic (no model to read a target from)")
    if str(target) == str(cfg.model.hook) or cfg.model.get("hooks"):
        raise ConfigError("model.target_hook", target, "a hook other than model.hook (and model.hooks null)")


# Fields whose own check accepts more than their default's type (trainer.devices: 1, or "auto", "0,1", [0, 1]).
_OWN_TYPE_CHECKS = ("trainer.devices",)
# Passed through to Lightning and W&B, whose flags also take words (deterministic="warn", save_last="link",
# log_model="all"): their numbers are checked, their flags are left to them.
_PASSTHROUGH = ("trainer.", "callbacks.", "logger.")
_INTERPOLATION = re.compile(r"\$\{(\.?[\w.]+)\}")  # ${seed}, ${.synthetic.d_in}: a plain reference, no resolver


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "defaults" and not (prefix == "" and key == "hydra"):
                yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


@functools.cache
def default_types() -> dict[str, str]:
    """conf/'s YAML files as the type schema of the run config: "number" for a field whose values in every file
    are numbers (8 in one, 0.5 in another), "bool" for one that is always true or false. A plain reference
    (data.seed: ${seed}) takes the type of what it names; fields that are null, strings, lists or of mixed types
    in the files are left to their own checks."""
    found: dict[str, set[str]] = {}
    refs: dict[str, str] = {}
    for file in sorted(CONF_DIR.rglob("*.yaml")):
        parts = file.relative_to(CONF_DIR).parts
        if parts[0] == "hydra":
            continue
        global_package = len(parts) == 1 or "@package _global_" in file.read_text()
        package = "" if global_package else ".".join(parts[:-1])
        for path, value in _leaves(OmegaConf.to_container(OmegaConf.load(file), resolve=False), package):
            match = _INTERPOLATION.fullmatch(value) if isinstance(value, str) else None
            if match:
                ref = match.group(1)
                refs[path] = path.rsplit(".", 1)[0] + ref if ref.startswith(".") else ref
            elif value is not None:
                kind = "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "other"
                found.setdefault(path, set()).add(kind)
    for path, ref in refs.items():
        found.setdefault(path, set()).update(found.get(ref, {"other"}))
    return {path: next(iter(kinds)) for path, kinds in found.items() if kinds in ({"number"}, {"bool"})}


def check_types(cfg: DictConfig) -> None:
    """Every field of the config that conf/ declares a number or a bool (default_types) holds one, or null: a
    string where a number belongs (data.seed=abc) fails here in one line, not as a traceback deep in a run."""
    for path, kind in default_types().items():
        if path in _OWN_TYPE_CHECKS:
            continue
        try:
            value = OmegaConf.select(cfg, path)
        except Exception:  # noqa: BLE001 - not resolvable here (e.g. ${hydra:...} outside a run): not a type
            continue
        if value is None:
            continue
        if kind == "bool":
            if not path.startswith(_PASSTHROUGH):
                check_bool(path, value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "a number")


def _integer(field: str, value: Any) -> None:
    """An integer of any sign (a seed); 2e6-style integral floats are integers."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(field, value, "an integer")


def check_run_config(cfg: DictConfig) -> None:
    _integer("seed", cfg.seed)
    _integer("data.seed", cfg.data.seed)
    check_types(cfg)
    check_model_config(cfg.model)
    data = cfg.data
    check_choice("data.source", data.source, SOURCES)
    if data.source == "text_files" and (data.get("path") is None or not Path(str(data.path)).expanduser().exists()):
        raise ConfigError("data.path", data.get("path"), "an existing text file or directory")
    if data.source == "hf" and not data.get("path"):
        raise ConfigError("data.path", data.get("path"), "a Hugging Face dataset name or local directory")
    for name in ("context_size", "batch_size", "buffer_tokens", "train_tokens", "normalize_tokens",
                 "model_batch_size"):
        _int(f"data.{name}", data[name])
    if _int("data.buffer_tokens", data.buffer_tokens) < 2 * _int("data.batch_size", data.batch_size):
        raise ConfigError("data.buffer_tokens", data.buffer_tokens, "at least 2 x data.batch_size")
    if not 0 < float(data.eval_fraction) < 1:
        raise ConfigError("data.eval_fraction", data.eval_fraction, "a fraction strictly between 0 and 1")
    check_choice("data.normalize", data.normalize, METHODS)
    if data.source == "synthetic":
        SyntheticSpec.from_config(data)
    cache_root(data.get("cache"), cfg.paths.cache_dir, create=False)
    check_transcoder(cfg)
    check_positive("optim.lr", cfg.optim.lr)
    if cfg.optim.betas is not None and (len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas)):
        raise ConfigError("optim.betas", list(cfg.optim.betas), "null or two numbers in [0, 1)")
    check_choice("optim.lr_warmup", cfg.optim.lr_warmup, ("linear", "cosine"))
    check_bool("optim.fused", cfg.optim.get("fused", True))
    check_positive("optim.lr_warmup_steps", cfg.optim.lr_warmup_steps, allow_zero=True, integer=True)
    if not 0 <= float(cfg.optim.lr_decay_fraction) < 1:
        raise ConfigError("optim.lr_decay_fraction", cfg.optim.lr_decay_fraction, "a fraction in [0, 1)")
    _int("eval.tokens", cfg.eval.tokens)
    _int("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.every_n_steps is not None:
        _int("eval.every_n_steps", cfg.eval.every_n_steps)
    if cfg.trainer.get("max_steps") is not None:
        _int("trainer.max_steps", cfg.trainer.max_steps)
    check_precision(cfg.trainer.get("precision", "32-true"))
    check_devices(cfg.trainer.get("devices", "auto"))
    if "num_nodes" in cfg.trainer:
        _int("trainer.num_nodes", cfg.trainer.num_nodes)
    _int("dead_window_tokens", cfg.dead_window_tokens)
    check_choice("nan_policy", cfg.get("nan_policy", "stop"), NAN_POLICIES)
    check_bool("compile", cfg.get("compile", False))
    check_ckpt_path(cfg.get("ckpt_path"))
    init_from = cfg.get("init_from")
    if init_from is not None and not (Path(str(init_from)).expanduser() / "cfg.json").is_file():
        raise ConfigError("init_from", init_from, "null or a SAELens-format SAE directory (cfg.json + "
                          "sae_weights.safetensors)")
