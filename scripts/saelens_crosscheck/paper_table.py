"""SynthSAEBench's table (arXiv 2602.14687: 200M samples, 5 seeds, L0 25) beside a cross-check's saelab and
SAELens rows (run in saelab's venv):

    paper_table.py OUT [--l0 25]        reads OUT/runs.csv (score.py), prints the markdown table

F1 is the paper's convention (every latent against its nearest true feature, dead latents 0: `synthsaebench_f1`);
BatchTopK and Matryoshka are encoded by the batch top-k as the paper does (`batch_topk_synthsaebench_f1`: saelab's
eval.batch_topk, score.py's BatchTopKExported for SAELens). mcc: the one-to-one (Hungarian) mean |cos|.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

# variant -> (the paper's name, its F1, its mcc) at L0 25 (200M samples, 5 seeds)
PAPER = {"batchtopk": ("BatchTopK", 0.7316, 0.7574), "matryoshka_batchtopk": ("Matryoshka BatchTopK", 0.8793, 0.7927),
         "jumprelu": ("JumpReLU", 0.7317, 0.7527), "relu": ("Standard L1", 0.5562, 0.6039)}
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")


def f1_key(variant: str) -> str:
    return "batch_topk_synthsaebench_f1" if variant in BATCH_TOPK else "synthsaebench_f1"


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan, 0
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return mean, sd, len(v)


def cell(values: list[float], digits: int = 3) -> str:
    mean, sd, n = mean_sd(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def table(rows: list[dict], l0: float) -> str:
    lines = ["| variant | source | seeds | L0 | F1 (paper's) | mcc | FVU | dead |", "|---|---|---|---|---|---|---|---|"]
    for variant, (name, f1, mcc) in PAPER.items():
        lines.append(f"| {name} | paper (200M samples) | 5 | 25 | {f1:.3f} | {mcc:.3f} | - | - |")
        for impl in ("saelab", "SAELens"):
            mine = [r for r in rows if r["impl"] == impl and r["variant"] == variant and float(r["target_l0"]) == l0]
            if not mine:
                continue

            def col(key: str, mine=mine) -> list[float]:
                return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in mine]

            lines.append(f"| {name} | {impl} | {len(mine)} | {cell(col('l0'), 1)} | {cell(col(f1_key(variant)))} | "
                         f"{cell(col('mcc'))} | {cell(col('fvu'))} | {cell(col('dead_fraction'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--l0", type=float, default=25.0)
    args = ap.parse_args(argv)
    with (args.out / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    print(table(rows, args.l0), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
