"""What storing cached activations in 16 bits costs a trained SAE: float32 against bfloat16 (or float16) caches.

    python scripts/cache_dtype_quality.py RUNS_DIR [--heldout-f32 EVAL_DIR] [--dtype bfloat16]

RUNS_DIR holds finished saelab-train jobs (at any depth, e.g. one fan-out sweep per variant and cache dtype) that
differ only in `data.cache_dtype` and `seed`, per variant (`sae=`, default relu). For each variant and each of
held-out FVU, L0 and spliced hidden cosine it prints one markdown row: the float32 jobs' mean ± std over seeds, the
16-bit jobs' mean ± std, and their difference (16-bit minus float32) as the mean ± std of the per-seed differences
(a seed's two jobs share their initialisation and, with a fixed data.seed, the order of the activations, so the
pairs differ only by the storage dtype), with the seeds' own spread beside it for scale.

A job's metrics.json measures on the held-out activations of its own cache, so a 16-bit job's FVU and L0 are on
rounded held-out activations. EVAL_DIR holds `saelab-eval <16-bit job>/sae data.cache_dtype=float32 ...` outputs
(metrics.json with `evaluated` naming the SAE): with it, a second row per metric gives the 16-bit SAEs on the
float32 held-out activations, against the same float32 jobs. The spliced cosine never reads the cache (it runs
the model), so it is the same either way.

    python scripts/cache_dtype_quality.py --rounding FLOAT32_CACHE BFLOAT16_CACHE

compares two caches of the same key inputs but the dtype (saelab-cache list's directories): whether every stored
16-bit row is the float32 row rounded to nearest, and the rounding's own FVU (its squared error over the float32
activations' variance about their mean), per stream: the floor a 16-bit cache adds to any reconstruction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = (("fvu", "FVU", 4), ("l0", "L0", 2), ("spliced_hidden_cosine", "spliced hidden cosine", 4))


def overrides_of(metrics: dict) -> dict[str, str]:
    return dict(str(o).lstrip("+").split("=", 1) for o in metrics.get("overrides", []) if "=" in str(o))


def job_key(metrics: dict) -> tuple[str, str, int]:
    """(variant, cache dtype, seed) from the job's overrides (the defaults where an override is absent)."""
    over = overrides_of(metrics)
    return over.get("sae", "relu"), over.get("data.cache_dtype", "float32"), int(over.get("seed", 0))


def read_runs(root: Path) -> dict[tuple[str, str, int], dict]:
    runs = {}
    for path in sorted(root.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if "evaluated" in metrics:  # a saelab-eval output, not a run
            continue
        key = job_key(metrics)
        if key in runs:
            raise SystemExit(f"error: two jobs for {key}: {runs[key]['_path']} and {path}")
        runs[key] = {**metrics, "_path": str(path)}
    return runs


def read_evals(root: Path, runs: dict) -> dict[tuple[str, str, int], dict]:
    """saelab-eval outputs keyed by the (variant, dtype, seed) of the run whose export they evaluated (the run is
    found by its last two directories, <sweep>/<job>, so a moved RUNS_DIR still matches)."""
    by_tail = {Path(m["_path"]).parent.parts[-2:]: key for key, m in runs.items()}
    evals = {}
    for path in sorted(root.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        tail = Path(metrics["evaluated"]).parent.parts[-2:]
        if tail not in by_tail:
            raise SystemExit(f"error: {path} evaluated {metrics['evaluated']}, no job of RUNS_DIR")
        evals[by_tail[tail]] = metrics
    return evals


def mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def signed(value: float, digits: int) -> str:
    return f"{value:+.{digits + 1}f}"


def rows(runs: dict, other: dict, dtype: str, label: str) -> list[str]:
    out = []
    for sae in sorted({k[0] for k in runs}):
        seeds = sorted(s for (v, d, s) in runs if v == sae and d == "float32" and (v, dtype, s) in other)
        if not seeds:
            continue
        for key, name, digits in METRICS:
            base = [float(runs[(sae, "float32", s)][key]) for s in seeds]
            cast = [float(other[(sae, dtype, s)][key]) for s in seeds]
            diffs = [c - b for b, c in zip(base, cast, strict=True)]
            spread = statistics.stdev(base) if len(base) > 1 else float("nan")
            d_std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            paired = f"{signed(statistics.fmean(diffs), digits)} ± {d_std:.{digits + 1}f}"
            out.append(f"| {sae} | {name}{label} | {len(seeds)} | {mean_std(base, digits)} | "
                       f"{mean_std(cast, digits)} | {paired} | {spread:.{digits + 1}f} |")
    return out


def rounding(float32_cache: Path, half_cache: Path) -> None:
    import numpy as np
    import torch

    from saelab.data.cache import decode

    def rows(cache: Path, stream: str, kind: str) -> torch.Tensor:
        return torch.cat([decode(np.load(p), kind) for p in sorted(cache.glob(f"{stream}-[0-9]*.npy"))])

    dtype = json.loads((half_cache / "manifest.json").read_text())["dtype"]
    for stream in ("train", "eval"):
        full, half = rows(float32_cache, stream, "float32").double(), rows(half_cache, stream, dtype).double()
        exact = torch.equal(full.float().to(getattr(torch, dtype)).double(), half)
        err = (full - half).pow(2).sum() / (full - full.mean(0)).pow(2).sum()
        print(f"{stream}: {len(full)} rows; {dtype} rows == float32 rows rounded to nearest: {exact}; "
              f"rounding FVU {err.item():.3g}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rounding"] and len(argv) == 3:
        rounding(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--heldout-f32", type=Path, help="saelab-eval outputs of the 16-bit jobs on float32 held-out")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = parser.parse_args(argv)
    runs = read_runs(args.runs_dir)
    if not runs:
        raise SystemExit(f"error: no metrics.json under {args.runs_dir}")
    print(f"| variant | metric | seeds | float32 cache | {args.dtype} cache | {args.dtype} - float32 (paired) "
          "| float32 seed std |")
    print("|---|---|---:|---|---|---|---:|")
    lines = rows(runs, runs, args.dtype, "")
    if args.heldout_f32:
        lines += rows(runs, read_evals(args.heldout_f32, runs), args.dtype, " (on float32 held-out)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
