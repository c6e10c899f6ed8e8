"""Checks on the raw command line, made before Hydra composes anything (one-line errors)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from saelab.errors import ConfigError
from saelab.run.compose import CONF_DIR, compose_run_config, config_dirs_of

# Hydra flags after which no job runs (print and exit), or that compose a config other than saelab/conf/train.yaml.
_NO_JOB_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion",
                 "-sc"}
_SEARCHPATH_ARG = re.compile(r"^\+?hydra\.searchpath=")  # already among the overrides
_OTHER_CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}


def _search_dirs(argv: list[str]) -> list[Path]:
    """The packaged configs plus the user's directories (--config-dir, hydra.searchpath=[file://...])."""
    return [CONF_DIR, *config_dirs_of(argv)]


def _group_options(group: str, search_dirs: list[Path]) -> list[str] | None:
    folders = [d / group for d in search_dirs if (d / group).is_dir()]
    if not folders:
        return None
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def check_group_overrides(argv: list[str]) -> str | None:
    """Return an error line for a bad command line, else None: first `group=option` overrides whose option
    does not exist, then an output directory that cannot be created (see `check_output_dir`).

    `hydra/<group>=option` (Hydra's own and its plugins' groups, e.g. hydra/launcher=submitit_slurm) is left
    to Hydra, which knows the plugins' options.
    """
    search_dirs = _search_dirs(argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra") or "." in key or "(" in value:
            continue  # a field override, a Hydra setting, or a sweep expression: Hydra checks those
        options = _group_options(key, search_dirs)
        if options is None:
            continue
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice != "null" and choice not in options:
                return f"{key}={choice!r} is not allowed: expected one of {', '.join(options)}"
    return check_output_dir(argv)


def writable_problem(directory: Path) -> str | None:
    """Why `directory` could not be created and written to, or None. Creates nothing that stays behind."""
    ancestor = directory
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".saelab-write-check-", dir=ancestor)
    except OSError as err:
        return f"cannot create directories in {ancestor}: {err.strerror or err}"
    os.rmdir(probe)
    return None


def check_output_dir(argv: list[str]) -> str | None:
    """An error line if the run (or sweep) directory this command line would use cannot be created.

    Hydra creates that directory before the task runs, and a failure there is a traceback; this resolves
    hydra.run.dir (hydra.sweep.dir for a multirun) from the same config Hydra composes, then tries to create
    a directory in its nearest existing ancestor. Anything this cannot compose is left to Hydra to report.
    """
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if flags & (_NO_JOB_FLAGS | _OTHER_CONFIG_FLAGS):
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.utils import setup_globals
        from omegaconf import OmegaConf

        overrides = [a for i, a in enumerate(argv) if not a.startswith("-") and (
            i == 0 or argv[i - 1] not in ("--config-dir", "-cd"))]
        parsed = OverridesParser.create().parse_overrides(overrides)
        overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
        setup_globals()  # the ${now:...} resolver the directory patterns use
        cfg = compose_run_config(overrides, hydra_section=True, config_dirs=config_dirs_of(
            [a for a in argv if not _SEARCHPATH_ARG.match(a)]))
        multirun = ({"-m", "--multirun"} & flags or str(cfg.hydra.mode) == "MULTIRUN") and not (
            {"-r", "--run"} & flags)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        directory = Path(str(OmegaConf.select(cfg, key))).expanduser().absolute()
        output_dir = OmegaConf.select(cfg, "paths.output_dir")
    except Exception:  # Hydra reports its own composition errors, with context
        return None
    problem = writable_problem(directory)
    if problem is None:
        return None
    given = {o.key_or_group: o.value() for o in parsed if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir")}
    field, value = (key, given[key]) if key in given else ("paths.output_dir", output_dir)
    return str(ConfigError(field, value, f"a directory saelab can create and write to ({problem})"))
