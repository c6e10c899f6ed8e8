"""A sweep's job directories read into one table: `collect(root)` -> Sweep (saelab-report's rows).

Every job directory (one holding `.hydra/overrides.yaml` or `metrics.json`) becomes one row: its overrides
and its metrics.json. Jobs without metrics.json are kept and marked `failed` (an error.txt, *.err or *.log
shows an error; its tail goes in the `error` column) or `incomplete` (still running, or killed silently).

Series (one line per series on the plots), unless group_by names the keys: the overrides that vary
across jobs, except the swept coefficient (the numeric override with the most distinct values, i.e. the
knob that moves a run along the L0 axis) and nuisance keys (seed, paths.*, hydra.*, logger*). So a sweep of
`sae=relu,gated sae.sparsity_coefficient=...` gives one series per variant, and adding
`sae.aux_loss=true,false` splits each variant per ablation setting. With nothing left, one series per
variant (metrics.json's `variant`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from saelab.metrics import registry

NUISANCE = re.compile(r"^(seed|paths\..*|hydra\..*|logger.*|callbacks\..*)$")
ERROR_LINE = re.compile(r"Traceback|\[ERROR\]|\b\w*(Error|Exception)\b|^error:", re.IGNORECASE)
ERROR_TAIL_LINES = 3


def find_job_dirs(root: Path) -> list[Path]:
    """Job directories under root (at any depth), in natural order: 0, 1, 2, ..., 10."""
    found = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in root.rglob("metrics.json")}

    def natural(path: Path) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path.relative_to(root)))]

    return sorted(found, key=natural)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """['sae=gated', '+sae.aux_loss=true'] -> {'sae': 'gated', 'sae.aux_loss': 'true'} (deletions dropped)."""
    parsed = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            parsed[key.lstrip("+")] = value
    return parsed


def error_tail(job_dir: Path) -> str | None:
    """The last lines of error.txt, else of the last error in a *.err or *.log file of the job."""
    error_file = job_dir / "error.txt"
    if error_file.is_file():
        lines = [ln.strip() for ln in error_file.read_text(errors="replace").splitlines() if ln.strip()]
        return " / ".join(lines[-ERROR_TAIL_LINES:]) or "error.txt (empty)"
    for pattern in ("*.err", "*.log"):
        for path in sorted(job_dir.glob(pattern)):
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            hits = [i for i, ln in enumerate(lines) if ERROR_LINE.search(ln)]
            if hits:
                return f"{path.name}: " + " / ".join(lines[hits[-1] :][-ERROR_TAIL_LINES:])
    return None


def read_job(job_dir: Path, root: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(row of metrics and status, overrides) for one job directory."""
    row: dict[str, Any] = {"job": str(job_dir.relative_to(root)) if job_dir != root else "."}
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    metrics_file = job_dir / "metrics.json"
    metrics = None
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (json.JSONDecodeError, OSError) as err:
            row["error"] = f"unreadable metrics.json: {err}"
    if metrics is not None:
        row["status"] = "ok"
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None})
        overrides = overrides if overrides is not None else metrics.get("overrides")
    else:
        row["error"] = row.get("error") or error_tail(job_dir)
        row["status"] = "failed" if row["error"] else "incomplete"
    return row, parse_overrides(overrides or [])


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


@dataclass
class Sweep:
    table: pd.DataFrame  # one row per job: job, status, series, overrides, metrics, error
    swept: str | None  # the swept coefficient's column
    varying: list[str]  # override columns whose value differs between jobs


def collect(root: Path, group_by: Sequence[str] | None = None) -> Sweep:
    """The sweep table with a `series` column (see the module docstring for the default grouping)."""
    rows, overrides = [], []
    for job_dir in find_job_dirs(root):
        row, ov = read_job(job_dir, root)
        rows.append(row)
        overrides.append(ov)
    taken = {"job", "status", "series", "error", *(k for row in rows for k in row)}
    keys = list(dict.fromkeys(k for ov in overrides for k in ov))
    column = {k: f"override:{k}" if k in taken else k for k in keys}
    for row, ov in zip(rows, overrides, strict=True):
        row.update({column[k]: ov.get(k) for k in keys})
    table = pd.DataFrame(rows, columns=list(dict.fromkeys(["job", "status", *(k for r in rows for k in r)])))
    overridden = [column[k] for k in keys]
    varying = [c for c in overridden if table[c].astype(str).nunique() > 1]
    swept = swept_coefficient(table, varying)
    default_keys = [c for c in varying if c != swept and not NUISANCE.match(c)]
    one_job_per_series = bool(default_keys) and table[default_keys].astype(str).agg("|".join, axis=1).is_unique
    if not group_by and one_job_per_series and "variant" in table:
        # Every job its own series (e.g. experiment=variant_pareto's `+point=`): a curve needs shared series,
        # so fall back to one series per variant.
        default_keys = ["variant"]
    table["series"] = series_labels(table, group_by or default_keys)
    metrics = [c for c in registry.shown("sweep") if c in table]  # the registry's order, then the rest
    first = ["job", "status", "series", *varying, *metrics]
    constant = [c for c in overridden if c not in varying]
    rest = [c for c in table if c not in {*first, *constant, "error"}]
    return Sweep(table[[*first, *rest, *constant, *(["error"] if "error" in table else [])]], swept, varying)


def swept_coefficient(table: pd.DataFrame, varying: Sequence[str]) -> str | None:
    """The numeric varying override with the most distinct values (ties: the later override)."""
    numeric = [k for k in varying if not NUISANCE.match(k) and table[k].dropna().map(_is_number).all()]
    if not numeric:
        return None
    return max(reversed(numeric), key=lambda k: table[k].nunique())


def series_labels(table: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """'sae=gated, sae.aux_loss=true' per row; the variant (or 'all') when there are no keys."""
    missing = [k for k in keys if k not in table]
    if missing:
        have = ", ".join(table.columns)
        raise SystemExit(f"error: --group-by {', '.join(missing)}: not a column of the table ({have})")
    if not keys:
        variant = table["variant"] if "variant" in table else pd.Series("all", index=table.index)
        return variant.fillna("?").astype(str)
    return table.apply(lambda r: ", ".join(f"{k}={'?' if pd.isna(r[k]) else r[k]}" for k in keys), axis=1)
