"""Checks on the raw command line, made before Hydra composes anything (one-line errors)."""

from __future__ import annotations

import re
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _search_dirs(argv: list[str]) -> list[Path]:
    """conf/ plus any `file://` directory added with hydra.searchpath=[...] on the command line."""
    dirs = [CONF_DIR]
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            dirs += [Path(p) for p in re.findall(r"file://([^,\]\s'\"]+)", arg)]
    return dirs


def _group_options(group: str, search_dirs: list[Path]) -> list[str] | None:
    folders = [d / group for d in search_dirs if (d / group).is_dir()]
    if not folders:
        return None
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def check_group_overrides(argv: list[str]) -> str | None:
    """Return an error line for `group=option` overrides whose option does not exist, else None."""
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
    return None
