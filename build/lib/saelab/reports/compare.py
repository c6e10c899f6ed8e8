"""`saelab-report --compare KEY=A,B`: a claim's comparison, regenerated from its runs with its significance.

A claim such as "the frozen decoder in L_aux beats the unfrozen one at equal L0" is a comparison of two values of
one override over seeds, at each setting of the others (e.g. each sae.target_l0). For every such setting that has
finished runs of both A and B, each --metric gets A's and B's mean ± std over seeds, the difference A - B, and
Welch's t-test (unequal variances): t = (mean_A - mean_B) / sqrt(s_A^2/n_A + s_B^2/n_B), with Welch-Satterthwaite
degrees of freedom, and its two-sided p. One verdict line per metric counts the settings where A is below or above
B at p < ALPHA, so re-running an experiment rewrites its verdict instead of leaving hand-written numbers behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from scipy import stats

from saelab.reports.sweep import Sweep
from saelab.reports.tables import SEED_COLUMNS

ALPHA = 0.05


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(t, degrees of freedom, two-sided p) of Welch's t-test of mean(a) = mean(b); NaNs with < 2 values a side."""
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return math.nan, math.nan, math.nan
    var_a, var_b = pd.Series(a).var(ddof=1) / n_a, pd.Series(b).var(ddof=1) / n_b
    if var_a + var_b == 0:
        return math.nan, math.nan, math.nan
    t = (sum(a) / n_a - sum(b) / n_b) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    return t, df, float(2 * stats.t.sf(abs(t), df))


def parse_compare(spec: str, sweep: Sweep) -> tuple[str, str, str]:
    """'sae.aux_loss=frozen_decoder,unfrozen_decoder' -> (the table's column, A, B); SystemExit names a bad spec."""
    key, _, values = spec.partition("=")
    pair = [v.strip() for v in values.split(",")]
    if len(pair) != 2 or not all(pair):
        raise SystemExit(f"error: --compare {spec!r}: expected KEY=A,B (two values of one override)")
    column = next((c for c in (key, f"override:{key}") if c in sweep.table), None)
    if column is None:
        raise SystemExit(f"error: --compare {key}: not an override of these runs ({', '.join(sweep.varying)})")
    return column, pair[0], pair[1]


def compare(sweep: Sweep, column: str, a: str, b: str, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (setting of the other varying overrides, metric) with both A and B finished."""
    table = sweep.table[sweep.table["status"] == "ok"].astype({column: str})
    settings = [c for c in sweep.varying if c != column and c not in SEED_COLUMNS]
    rows = []
    groups = table.groupby(settings, sort=False) if settings else [((), table)]
    for values, runs in groups:
        values = values if isinstance(values, tuple) else (values,)
        setting = ", ".join(f"{k}={v}" for k, v in zip(settings, values, strict=True)) or "all"
        for metric in metrics:
            if metric not in runs:
                continue
            side_a = runs.loc[runs[column] == a, metric].dropna().astype(float).tolist()
            side_b = runs.loc[runs[column] == b, metric].dropna().astype(float).tolist()
            if not side_a or not side_b:
                continue
            t, df, p = welch_t(side_a, side_b)
            rows.append({"setting": setting, "metric": metric, "n_a": len(side_a), "n_b": len(side_b),
                         "mean_a": _mean(side_a), "std_a": _std(side_a), "mean_b": _mean(side_b),
                         "std_b": _std(side_b), "difference": _mean(side_a) - _mean(side_b), "t": t, "df": df,
                         "p": p})
    return pd.DataFrame(rows)


def verdicts(result: pd.DataFrame, a: str, b: str) -> list[str]:
    """Per metric: in how many settings A is significantly below, above, or not distinguishable from B."""
    lines = []
    for metric, rows in result.groupby("metric", sort=False):
        significant = rows["p"] < ALPHA
        below = int((significant & (rows["difference"] < 0)).sum())
        above = int((significant & (rows["difference"] > 0)).sum())
        lines.append(f"{metric}: {a} below {b} in {below}, above in {above}, not distinguishable (p >= {ALPHA} or "
                     f"under 2 seeds a side) in {len(rows) - below - above} of {len(rows)} settings")
    return lines


def comparison_markdown(result: pd.DataFrame, column: str, a: str, b: str) -> str:
    """The comparison table (mean ± std per side, difference, Welch's t, df, p) and its verdict lines."""
    if result.empty:
        return f"No setting has finished runs of both {column}={a} and {column}={b}."
    lines = [f"| setting | metric | {a} | {b} | difference | t | df | p |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in result.itertuples():
        lines.append(f"| {r.setting} | {r.metric} | {_pm(r.mean_a, r.std_a, r.n_a)} | {_pm(r.mean_b, r.std_b, r.n_b)}"
                     f" | {r.difference:.4g} | {_num(r.t)} | {_num(r.df)} | {_num(r.p)} |")
    return "\n".join([*lines, "", *(f"- {line}" for line in verdicts(result, a, b))])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    return float(pd.Series(values).std(ddof=1)) if len(values) > 1 else math.nan


def _num(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3g}"


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4g}" + ("" if math.isnan(std) else f" ± {std:.2g}") + f" (n={n})"
