"""What the Lightning loop adds to the training step: `saelab-train` on cached activations vs train_step.py.

    .venv/bin/python -m benchmarks.loop_overhead [--variant relu] [--steps 60] [--batch 4096] [--d-sae 3072]
        [--repeats 2] [--json OUT] [-- extra overrides]

1. Runs the main job (MiniLM, the offline default; its activation cache is built first if missing) for
   `--steps` steps of `--batch` with `sae.d_sae=--d-sae`, default callbacks (checkpoints every 100 steps,
   progress bar) and the CSV logger, logging every 10 steps as by default. Its steady-state tokens/s is the
   median of the `tok/s` it logs after the first 20 steps (each a 20-step window of wall time between
   training steps: data loading, logging, checkpointing, everything).
2. Runs benchmarks/train_step.py (in a fresh process) before the first run and after each run (--repeats
   runs), same variant and shapes, on the same normalised activations (read from the run's cache shards,
   divided by its normalisation scale).
3. Prints every figure and the overhead 1 - median(loop) / median(benchmark) (target: at most 5%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import train_step

REPO = Path(__file__).resolve().parents[1]


def run_main_job(variant: str, steps: int, batch: int, d_sae: int, out: Path, extra: list[str]
                 ) -> tuple[Path, Path]:
    """(run dir, activation cache dir) of one main-job run."""
    args = [f"sae={variant}", f"sae.d_sae={d_sae}", f"data.batch_size={batch}",
            f"data.train_tokens={steps * batch}", "logger=csv", "eval.spliced_windows=0", "eval.tokens=8192",
            f"paths.output_dir={out}", "callbacks.progress_bar.refresh_rate=10", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "saelab.train", *args], cwd=REPO, env=env, text=True,
                            capture_output=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    (run_dir,) = {p.parent for p in out.rglob("metrics.json")}
    cache = re.search(r"activation cache: (?:building|reusing|extending) (\S+)", result.stdout + result.stderr)
    if cache is None:
        raise SystemExit("the run did not use the activation cache (data.cache=off?)")
    return run_dir, Path(cache.group(1))


def steady_tokens_per_s(run_dir: Path, after_step: int = 20) -> float:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines()))
    values = [float(r["tok/s"]) for r in rows if r.get("tok/s") and int(r["step"]) >= after_step]
    if not values:
        raise SystemExit("no tok/s logged after step 20: use more --steps")
    return statistics.median(values)


def cached_activations(cache_dir: Path, scale: float, n_rows: int) -> torch.Tensor:
    """The first n_rows training activations of a cache directory, normalised."""
    shards = sorted(cache_dir.glob("train-*.npy"))
    rows, have = [], 0
    for shard in shards:
        rows.append(np.array(np.load(shard, mmap_mode="r")[: n_rows - have]))
        have += len(rows[-1])
        if have >= n_rows:
            break
    return torch.from_numpy(np.concatenate(rows)) / scale


def _bench_subprocess(args: list[str]) -> float:
    """train_step.py's tokens/s, in a fresh process as the main job is."""
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args, "--json", fh.name], cwd=REPO,
                       check=True, capture_output=True)
        return float(json.loads(Path(fh.name).read_text())["tokens_per_s"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="relu", choices=sorted(train_step.DENSE_PASSES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "outputs" / "cache",
                        help="paths.cache_dir for the run (the default layout's cache is reused)")
    parser.add_argument("--repeats", type=int, default=2, help="main-job runs, each followed by a benchmark")
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="overrides appended to the main job")
    args = parser.parse_args(argv)

    overrides = [f"paths.cache_dir={args.cache_dir}", *args.extra]
    with tempfile.TemporaryDirectory() as tmp:  # a first short run makes sure the cache exists
        run_dir, cache_dir = run_main_job(args.variant, 2, args.batch, args.d_sae, Path(tmp) / "warm", overrides)
        scale = json.loads((run_dir / "metrics.json").read_text())["normalization_scale"]
        acts_file = Path(tmp) / "acts.pt"
        torch.save(cached_activations(cache_dir, scale, 8 * args.batch), acts_file)
        bench_args = ["--variant", args.variant, "--d-sae", str(args.d_sae), "--batch", str(args.batch),
                      "--acts", str(acts_file), "--steps", "20"]
        # Benchmark and loop alternate (B L B L ... B): this VM's speed drifts by several percent over minutes,
        # so the figures are medians over interleaved runs.
        bench, loop = [_bench_subprocess(bench_args)], []
        for repeat in range(args.repeats):
            run_dir, _ = run_main_job(args.variant, args.steps, args.batch, args.d_sae, Path(tmp) / f"run{repeat}",
                                      overrides)
            loop.append(steady_tokens_per_s(run_dir))
            bench.append(_bench_subprocess(bench_args))
    overhead = 1 - statistics.median(loop) / statistics.median(bench)
    result = {"variant": args.variant, "batch": args.batch, "d_sae": args.d_sae, "loop_tokens_per_s": loop,
              "benchmark_tokens_per_s": bench, "overhead": overhead}
    print(f"{args.variant}: saelab-train {', '.join(f'{v:,.0f}' for v in loop)} tok/s; train_step.py "
          f"{', '.join(f'{v:,.0f}' for v in bench)} tok/s (interleaved); loop overhead {100 * overhead:.1f}% "
          "(median against median)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
