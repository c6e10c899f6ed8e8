"""Checks on the raw command line, made before Hydra composes anything (one-line errors)."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _group_options(group: str) -> list[str] | None:
    folder = CONF_DIR / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> str | None:
    """Return an error line for `group=option` overrides whose option does not exist, else None."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra") or "." in key or "(" in value:
            continue  # a field override, a Hydra setting, or a sweep expression: Hydra checks those
        options = _group_options(key)
        if options is None:
            continue
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice != "null" and choice not in options:
                return f"{key}={choice!r} is not allowed: expected one of {', '.join(options)}"
    return None
