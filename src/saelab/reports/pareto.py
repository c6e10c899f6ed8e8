"""saelab-report's Pareto plots: one PNG per metric against L0 (or --x), one colour per series.

Pareto frontier of a series: the points no other point of the series beats on both axes (lower L0, better
metric: lower FVU / delta LM loss, higher cosine / loss recovered: the metric registry's `better`). A metric
with no better direction (shrinkage, a reference loss) gets its points joined in x order and no frontier claim;
a column the registry does not describe is taken as lower-is-better. Drawn from the seeds' means (tables.py's
aggregate_seeds), the points get one-standard-deviation error bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from saelab.metrics import registry


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

    better = registry.better(y) or "lower"
    data = table[(table["status"] == "ok") & table[x].notna() & table[y].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for label, group in data.groupby("series", sort=True):
        xs, ys = group[x].astype(float).to_numpy(), group[y].astype(float).to_numpy()
        points = ax.scatter(xs, ys, alpha=0.45, s=28)
        if f"{x}_std" in group and f"{y}_std" in group:  # seed means: one standard deviation each way
            ax.errorbar(xs, ys, xerr=group[f"{x}_std"].fillna(0).to_numpy(),
                        yerr=group[f"{y}_std"].fillna(0).to_numpy(), fmt="none", capsize=3,
                        ecolor=points.get_facecolor()[0][:3], alpha=0.7)
        if better == "none":  # no frontier to claim: the series' points in x order
            front = sorted(range(len(xs)), key=lambda i: xs[i])
        else:
            front = pareto_front(xs, ys, maximize_y=better == "higher")
        ax.plot(xs[front], ys[front], marker="o", color=points.get_facecolor()[0][:3], label=label)
    values = data[x].astype(float)
    if len(data) and (values > 0).all() and values.max() > 4 * values.min():  # a log axis for wide L0 ranges
        ax.set_xscale("log")
        plain = LogFormatter(labelOnlyBase=False)  # "40", not "4 x 10^1"
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)

    seeds = ""
    if "n_seeds" in data and len(data):
        low, high = int(data["n_seeds"].min()), int(data["n_seeds"].max())
        seeds = f" (mean ± std, {low if low == high else f'{low}-{high}'} seeds)"
    if better == "none":
        ax.set(xlabel=x, ylabel=f"{y} (no better direction)", title=f"{y} vs {x} per series{seeds}")
    else:
        ax.set(xlabel=x, ylabel=f"{y} ({better} is better)", title=f"{y} vs {x}: Pareto frontier per series{seeds}")
    ax.grid(True, which="both", alpha=0.3)
    if len(data):
        ax.legend(fontsize=8, title="series", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
