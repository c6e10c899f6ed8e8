"""`saelab-report <multirun dir>`: one table and Pareto plots for a (possibly unfinished) sweep.

Every job directory (one holding `.hydra/overrides.yaml` or `metrics.json`) becomes one row: its overrides
and its metrics.json. Jobs without metrics.json are kept and marked `failed` (an error.txt, *.err or *.log
shows an error; its tail goes in the `error` column) or `incomplete` (still running, or killed silently).
The table is written as CSV (report.csv) and printed as markdown; the plots are PNGs next to it.

Series (one line per series on the plots), unless --group-by names the keys: the overrides that vary
across jobs, except the swept coefficient (the numeric override with the most distinct values, i.e. the
knob that moves a run along the L0 axis) and nuisance keys (seed, paths.*, hydra.*, logger*). So a sweep of
`sae=relu,gated sae.sparsity_coefficient=...` gives one series per variant, and adding
`sae.aux_loss=true,false` splits each variant per ablation setting. With nothing left, one series per
variant (metrics.json's `variant`).

Seeds: when jobs differ only by `seed`, each setting also gets one row with the mean and standard deviation of
every metric over its seeds (report_seeds.csv, a "mean ± std" table), and the Pareto plots are drawn again
from those means with one-standard-deviation error bars (pareto_seeds_*.png).

Pareto frontier of a series: the points no other point of the series beats on both axes (lower L0, better
metric: lower FVU / delta LM loss, higher cosine / loss recovered).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger("saelab.reports.report")

DOWNSTREAM = ("delta_lm_loss", "spliced_hidden_cosine")  # causal LMs, encoders (saelab.metrics.spliced)
HIGHER_IS_BETTER = {"explained_variance", "cosine", "loss_recovered", "spliced_hidden_cosine", "mcc",
                    "recovered_fraction", "uniqueness", "firing_precision", "firing_recall", "firing_f1"}
METRIC_ORDER = ("variant", "architecture", "target_hook", "l0", "fvu", "explained_variance", "delta_lm_loss",
                "loss_recovered", "kl_sae", "spliced_hidden_cosine", "shrinkage", "cosine", "norm_ratio",
                "dead_fraction", "dense_fraction", "d_sae", "steps", "tokens_trained", "wall_time_s")
MARKDOWN_METRICS = ("l0", "fvu", "delta_lm_loss", "loss_recovered", "spliced_hidden_cosine", "mcc",
                    "recovered_fraction", "absorption_rate", "shrinkage", "dead_fraction", "steps", "wall_time_s")
NUISANCE = re.compile(r"^(seed|paths\..*|hydra\..*|logger.*|callbacks\..*)$")
ERROR_LINE = re.compile(r"Traceback|\[ERROR\]|\b\w*(Error|Exception)\b|^error:", re.IGNORECASE)
ERROR_TAIL_LINES = 3


# -- collecting ---------------------------------------------------------------------------------------------
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
    metrics = [c for c in METRIC_ORDER if c in table]
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


# -- seeds ---------------------------------------------------------------------------------------------------
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


# -- Pareto frontier and plots ------------------------------------------------------------------------------
def pareto_front(xs: Sequence[float], ys: Sequence[float], maximize_y: bool = False) -> list[int]:
    """Indices of the non-dominated points (x minimised; y minimised, or maximised), sorted by x.

    A point is dominated if another is at least as good on both axes and better on one; of identical
    points one is kept. Points with a NaN coordinate are never on the frontier.
    """
    sign = -1.0 if maximize_y else 1.0
    points = [(float(x), sign * float(y), i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))
              if not (math.isnan(float(x)) or math.isnan(float(y)))]
    front, best = [], math.inf
    for _, y, i in sorted(points):
        if y < best:
            front.append(i)
            best = y
    return front


def plot_pareto(table: pd.DataFrame, x: str, y: str, path: Path) -> Path:
    """Scatter of every finished job, one colour per series, its Pareto frontier joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    data = table[(table["status"] == "ok") & table[x].notna() & table[y].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for label, group in data.groupby("series", sort=True):
        xs, ys = group[x].astype(float).to_numpy(), group[y].astype(float).to_numpy()
        points = ax.scatter(xs, ys, alpha=0.45, s=28)
        if f"{x}_std" in group and f"{y}_std" in group:  # seed means: one standard deviation each way
            ax.errorbar(xs, ys, xerr=group[f"{x}_std"].fillna(0).to_numpy(),
                        yerr=group[f"{y}_std"].fillna(0).to_numpy(), fmt="none", capsize=3,
                        ecolor=points.get_facecolor()[0][:3], alpha=0.7)
        front = pareto_front(xs, ys, maximize_y=y in HIGHER_IS_BETTER)
        ax.plot(xs[front], ys[front], marker="o", color=points.get_facecolor()[0][:3], label=label)
    values = data[x].astype(float)
    if len(data) and (values > 0).all() and values.max() > 4 * values.min():  # a log axis for wide L0 ranges
        ax.set_xscale("log")
        plain = LogFormatter(labelOnlyBase=False)  # "40", not "4 x 10^1"
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)

    better = "higher" if y in HIGHER_IS_BETTER else "lower"
    seeds = ""
    if "n_seeds" in data and len(data):
        low, high = int(data["n_seeds"].min()), int(data["n_seeds"].max())
        seeds = f" (mean ± std, {low if low == high else f'{low}-{high}'} seeds)"
    ax.set(xlabel=x, ylabel=f"{y} ({better} is better)", title=f"{y} vs {x}: Pareto frontier per series{seeds}")
    ax.grid(True, which="both", alpha=0.3)
    if len(data):
        ax.legend(fontsize=8, title="series", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# -- output -------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame, columns: Sequence[str]) -> str:
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for _, row in table.iterrows()]
    return "\n".join([header, rule, *body])


def seeds_markdown(by_seed: pd.DataFrame, swept: str | None) -> str:
    """The per-setting table: mean ± std over seeds."""
    keys = ["series", *([swept] if swept and swept in by_seed else []), "n_seeds"]
    metrics = [c for c in MARKDOWN_METRICS if c in by_seed and by_seed[c].notna().any()]
    rows = []
    for _, r in by_seed.iterrows():
        cells = [_cell(r[k]) for k in keys]
        cells += [f"{_cell(r[m])} ± {_cell(r[f'{m}_std'])}" if not pd.isna(r[f"{m}_std"]) else _cell(r[m])
                  for m in metrics]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| " + " | ".join([*keys, *metrics]) + " |"
    return "\n".join([header, "|" + "|".join("---" for _ in [*keys, *metrics]) + "|", *rows])


def markdown_report(sweep: Sweep, root: Path, plots: Sequence[Path], csv: Path) -> str:
    table, swept = sweep.table, sweep.swept
    counts = table["status"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "incomplete"))
    columns = ["job", "status", "series", *([swept] if swept else []),
               *[c for c in MARKDOWN_METRICS if c in table and table[c].notna().any()]]
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


def wandb_online() -> bool:
    """A W&B run is active, or one could be started online (API key set and WANDB_MODE not offline)."""
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is not None:
        return True
    from saelab.run.loggers import wandb_api_key_configured

    mode = os.environ.get("WANDB_MODE", "").lower()
    return mode not in ("offline", "disabled", "dryrun") and wandb_api_key_configured()


def log_to_wandb(table: pd.DataFrame, plots: Sequence[Path], root: Path) -> None:
    """Best effort: a report run (or the active run) gets the table and the plots; failures only warn."""
    try:
        import wandb

        own_run = wandb.run is None
        run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "saelab"), job_type="report",
                                      name=f"report-{root.name}")
        run.log({"sweep_table": wandb.Table(dataframe=table.astype(str)),
                 **{f"pareto/{p.stem}": wandb.Image(str(p)) for p in plots}})
        if own_run:
            run.finish()
    except Exception as err:  # noqa: BLE001 - the report on disk is what matters
        log.warning("W&B logging skipped: %s", err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="a Hydra sweep dir: outputs/multirun/<date>/<time>")
    parser.add_argument("--out", type=Path, help="where report.csv and the PNGs go (default: the sweep dir)")
    parser.add_argument("--x", default="l0", help="x-axis metric, minimised (default: l0)")
    parser.add_argument("--y", default="fvu", help="y-axis metric of the first plot (default: fvu)")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="series key(s): an override key (sae, sae.aux_loss) or a metrics.json field "
                             "(variant); repeat or comma-separate. Default: see the module docstring")
    parser.add_argument("--wandb", choices=("auto", "off"), default="auto",
                        help="auto: also log table + plots to W&B when it is online")
    args = parser.parse_args(argv)

    root = args.multirun_dir.expanduser().resolve()
    if not root.is_dir():
        print(f"error: multirun_dir {root}: not a directory", file=sys.stderr)
        return 2
    out = (args.out or root).expanduser().resolve()
    group_by = [k.strip() for spec in args.group_by for k in spec.split(",") if k.strip()]
    sweep = collect(root, group_by)
    table = sweep.table
    if table.empty:
        print(f"error: no job directories (with .hydra/overrides.yaml or metrics.json) under {root}",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "report.csv"
    table.to_csv(csv, index=False)

    plots = []
    for y in dict.fromkeys([args.y, *DOWNSTREAM]):
        if args.x in table and y in table and table.loc[table["status"] == "ok", y].notna().any():
            plots.append(plot_pareto(table, args.x, y, out / f"pareto_{args.x}_vs_{y}.png"))
    report = markdown_report(sweep, root, plots, csv)
    by_seed = aggregate_seeds(sweep)
    if by_seed is not None:  # settings run with several seeds: their means with error bars
        seeds_csv = out / "report_seeds.csv"
        by_seed.to_csv(seeds_csv, index=False)
        seed_plots = [plot_pareto(by_seed, args.x, y, out / f"pareto_seeds_{args.x}_vs_{y}.png")
                      for y in dict.fromkeys([args.y, *DOWNSTREAM])
                      if args.x in by_seed and y in by_seed and by_seed[y].notna().any()]
        report += ("\n\n## Over seeds (mean ± std)\n\n" + seeds_markdown(by_seed, sweep.swept)
                   + f"\n\nCSV: {seeds_csv}\n" + "\n".join(f"Plot: {p}" for p in seed_plots))
        plots += seed_plots
    print(report)
    if args.wandb == "auto" and wandb_online():
        log_to_wandb(table, plots, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
