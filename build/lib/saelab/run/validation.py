"""Up-front validation of a run's config: cheap checks that fail before any model is loaded.

One pass per job (run/job.py's prepare_job, so a sweep refuses a bad job alone, before any group trains): the
config's types against conf/'s YAML files (check_types), then each section by the module that owns it: the data
source (data/sources/) and the shared data fields (data/datamodule.py), the model (data/model.py), a transcoder's
target (run/stream.py), the member's optimiser and policies (run/member.py), evaluation (run/evaluation.py), the
trainer (run/trainer_checks.py), checkpoints (run/checkpoints.py) and init_from (saes/saelens_format.py); the
variant checks its own section (SAEConfig.validate, run by prepare_job).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saelab.data.datamodule import check_data_config
from saelab.data.model import check_model_config
from saelab.data.sources import build_source
from saelab.errors import ConfigError, check_bool, check_integer
from saelab.run.checkpoints import check_ckpt_path
from saelab.run.compose import CONF_DIR
from saelab.run.evaluation import check_eval_config
from saelab.run.member import check_member_config
from saelab.run.stream import check_transcoder_config
from saelab.run.trainer_checks import check_trainer_config
from saelab.saes.saelens_format import check_init_from

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


def check_run_config(cfg: DictConfig) -> None:
    """The whole config of one job, in one pass (see the module docstring)."""
    check_integer("seed", cfg.seed)
    check_integer("data.seed", cfg.data.seed)
    check_types(cfg)
    check_model_config(cfg.model)
    source = build_source(cfg.data)  # the source's class, name and own fields
    check_data_config(cfg.data, cfg.paths.cache_dir)
    check_transcoder_config(cfg, source)
    check_member_config(cfg)
    check_eval_config(cfg.eval)
    check_trainer_config(cfg.trainer)
    check_ckpt_path(cfg.get("ckpt_path"))
    check_init_from(cfg.get("init_from"))
