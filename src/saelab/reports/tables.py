"""saelab-report's tables: the sweep as markdown (with its failed and incomplete jobs), and the seeds' aggregate.

Seeds: when jobs differ only by `seed`, each setting also gets one row with the mean and sample standard deviation
of every metric over its seeds (aggregate_seeds: report_seeds.csv, and a "mean ± std" markdown table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from saelab.metrics import registry
from saelab.reports.sweep import Sweep

SEED_COLUMNS = ("seed", "override:seed")


def aggregate_seeds(sweep: Sweep) -> pd.DataFrame | None:
    """Finished jobs that differ only by `seed`, one row per setting: every numeric metric's mean (its own
    column) and sample standard deviation (`<metric>_std`), and `n_seeds`. None when no setting has two seeds."""
    table = sweep.table[sweep.table["status"] == "ok"]
    seeds = [c for c in sweep.varying if c in SEED_COLUMNS]
    if not seeds or table.empty:
        return None
    keys = ["series", *(c for c in sweep.varying if c not in seeds)]
    skip = {"job", "status", "error", *keys, *seeds}
    metrics = [c for c in table if c not in skip and pd.api.types.is_numeric_dtype(table[c])]
    grouped = table.astype({k: str for k in keys}).groupby(keys, sort=False)
    if grouped.size().max() < 2:
        return None
    mean, std = grouped[metrics].mean(), grouped[metrics].std(ddof=1)
    out = pd.concat([mean, std.add_suffix("_std")], axis=1)
    out["n_seeds"] = grouped.size()
    out = out.reset_index()
    out.insert(1, "status", "ok")
    return out


def _cell(value: Any, column: str | None = None) -> str:
    """A markdown cell: a float in its metric's registry format (4 significant digits for other columns)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        metric = registry.find(column) if column is not None else None
        return metric.format(value) if metric is not None else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame, columns: Sequence[str]) -> str:
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for _, row in table.iterrows()]
    return "\n".join([header, rule, *body])


def seeds_markdown(by_seed: pd.DataFrame, swept: str | None) -> str:
    """The per-setting table: mean ± std over seeds."""
    keys = ["series", *([swept] if swept and swept in by_seed else []), "n_seeds"]
    metrics = [c for c in registry.shown("table") if c in by_seed and by_seed[c].notna().any()]
    rows = []
    for _, r in by_seed.iterrows():
        cells = [_cell(r[k]) for k in keys]
        cells += [f"{_cell(r[m], m)} ± {_cell(r[f'{m}_std'], m)}" if not pd.isna(r[f"{m}_std"]) else _cell(r[m], m)
                  for m in metrics]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| " + " | ".join([*keys, *metrics]) + " |"
    return "\n".join([header, "|" + "|".join("---" for _ in [*keys, *metrics]) + "|", *rows])


def markdown_report(sweep: Sweep, root: Path, plots: Sequence[Path], csv: Path) -> str:
    table, swept = sweep.table, sweep.swept
    counts = table["status"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "incomplete"))
    columns = ["job", "status", "series", *([swept] if swept else []),
               *[c for c in registry.shown("table") if c in table and table[c].notna().any()]]
    lines = [f"# Sweep report: {root}", "",
             f"{len(table)} jobs: {summary}." + (f" Swept coefficient: `{swept}`." if swept else ""),
             "", to_markdown(table, columns)]
    broken = table[table["status"] != "ok"]
    if len(broken):
        lines += ["", "## Failed or incomplete jobs", ""]
        for _, r in broken.iterrows():
            reason = _cell(r.get("error")) or "no metrics.json and no error found"
            lines.append(f"- {r['job']} ({r['status']}): {reason}")
    lines += ["", f"CSV: {csv}", *(f"Plot: {p}" for p in plots)]
    return "\n".join(lines)
