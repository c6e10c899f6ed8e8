"""A run's config, composed the one way saelab-train composes it: the packaged configs with command-line overrides.

The configs ship inside the package (`saelab/conf`, Hydra's search path `pkg://saelab.conf`), so an installed
saelab composes them from any directory. A user's own configs (a new `experiment=`, `model=`, ...) live in a
directory of theirs, added with `--config-dir DIR` or `hydra.searchpath=[file://DIR]` as in any Hydra app.

saelab-train composes through @hydra.main (which also makes the run directory); every other tool that needs the
config a run with the same overrides would get (saelab-eval, saelab-cache, saelab-dashboard, the up-front
checks) calls `compose_run_config` here, so they cannot drift from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONF_MODULE = "saelab.conf"
CONF_PKG = f"pkg://{CONF_MODULE}"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the same files, as a directory (the wheel installs it so)

_SEARCHPATH = re.compile(r"^\+?hydra\.searchpath=")
_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def config_dirs_of(argv: Sequence[str]) -> list[Path]:
    """The user's config directories a command line adds: `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`) and
    every `file://DIR` in `hydra.searchpath=[...]`."""
    dirs: list[Path] = []
    args = list(argv)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in _CONFIG_DIR_FLAGS:
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value:
                dirs.append(Path(value).expanduser().absolute())
        elif _SEARCHPATH.match(arg):
            dirs += [Path(p) for p in re.findall(r"file://([^,\]\s'\"]+)", arg)]
    return dirs


def with_config_dirs(overrides: Sequence[str], config_dirs: Sequence[Path]) -> list[str]:
    """`overrides` with `config_dirs` added to Hydra's search path (what `--config-dir` does for @hydra.main)."""
    overrides = list(overrides)
    if not config_dirs:
        return overrides
    added = ",".join(f"file://{Path(d).expanduser().absolute()}" for d in config_dirs)
    for i, override in enumerate(overrides):
        if _SEARCHPATH.match(override):
            key, value = override.split("=", 1)
            inner = value.strip().removeprefix("[").removesuffix("]").strip()
            overrides[i] = f"{key}=[{added}{',' + inner if inner else ''}]"
            return overrides
    return [*overrides, f"hydra.searchpath=[{added}]"]


def compose_run_config(overrides: Sequence[str] = (), hydra_section: bool = False,
                       config_dirs: Sequence[Path] = ()) -> DictConfig:
    """train.yaml composed with `overrides` (unresolved) and the user's `config_dirs` on the search path;
    `hydra_section`: with Hydra's own config too (hydra.run.dir, the launcher), as a run would see it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose("train", overrides=with_config_dirs(overrides, config_dirs), return_hydra_config=hydra_section)
