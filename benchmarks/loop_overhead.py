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

Runs minutes apart see this VM's speed drift by several percent, so each main-job run also carries StepTimer
(a callback added with a `+callbacks.step_timer` override). On the same steps, it measures the loop's wall
time between consecutive training steps, and the part of it that train_step.py also runs: step_loss,
backward, the SAE's before/after-optimiser hooks and Adam's update. The same-step overhead,
sum(period) / sum(step) - 1 over the steady-state steps, is free of that drift.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from benchmarks import train_step

REPO = Path(__file__).resolve().parents[1]
STEADY_AFTER = 20  # steps before this are warm-up (first batches, allocator, first log flush)


class StepTimer(L.Callback):
    """Per training step: the loop's period and the benchmark's part of it (see the module docstring).

    Written as JSON to `path` when training ends: {"period_s": [...], "step_s": [...]}, one entry per step.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.starts: list[float] = []
        self.step_s: list[float] = []
        self._core = 0.0
        self._mark = 0.0
        self._backward_start = 0.0

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._mark = time.perf_counter()
                self._core += self._mark - start
        return wrapper

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.member.step_loss = self._timed(pl_module.member.step_loss)
        pl_module.sae.before_optimizer_step = self._timed(pl_module.sae.before_optimizer_step)
        pl_module.sae.after_optimizer_step = self._timed(pl_module.sae.after_optimizer_step)
        # Lightning runs optimizer.step(closure): the closure (training_step, backward, before-step hooks) ends
        # with sae.before_optimizer_step, so Adam's own update runs from then until the post hook.
        trainer.optimizers[0].register_step_post_hook(self._after_adam)

    def _after_adam(self, *_):
        self._core += time.perf_counter() - self._mark

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        if len(self.starts) > 1:
            self.step_s.append(self._core)
        self._core = 0.0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._backward_start = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._core += time.perf_counter() - self._backward_start

    def on_train_end(self, trainer, pl_module) -> None:
        periods = [b - a for a, b in itertools.pairwise(self.starts)]
        self.path.write_text(json.dumps({"period_s": periods, "step_s": self.step_s[: len(periods)]}))


def same_step_overhead(timer_json: Path) -> float:
    """sum(period) / sum(benchmark part) - 1 over the steady-state steps of one run."""
    timings = json.loads(timer_json.read_text())
    periods, steps = timings["period_s"][STEADY_AFTER:], timings["step_s"][STEADY_AFTER:]
    if not periods:
        raise SystemExit(f"no steps after step {STEADY_AFTER}: use more --steps")
    return sum(periods) / sum(steps) - 1


def run_main_job(variant: str, steps: int, batch: int, d_sae: int, out: Path, extra: list[str]
                 ) -> tuple[Path, Path]:
    """(run dir, activation cache dir) of one main-job run."""
    args = [f"sae={variant}", f"sae.d_sae={d_sae}", f"data.batch_size={batch}",
            f"data.train_tokens={steps * batch}", "logger=csv", "eval.spliced_windows=0", "eval.tokens=8192",
            f"paths.output_dir={out}", "callbacks.progress_bar.refresh_rate=10",
            "+callbacks.step_timer._target_=benchmarks.loop_overhead.StepTimer",
            f"+callbacks.step_timer.path={out / 'step_timer.json'}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, env=env, text=True,
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
        bench, loop, same_step = [_bench_subprocess(bench_args)], [], []
        for repeat in range(args.repeats):
            out = Path(tmp) / f"run{repeat}"
            run_dir, _ = run_main_job(args.variant, args.steps, args.batch, args.d_sae, out, overrides)
            loop.append(steady_tokens_per_s(run_dir))
            same_step.append(same_step_overhead(out / "step_timer.json"))
            bench.append(_bench_subprocess(bench_args))
    overhead = 1 - statistics.median(loop) / statistics.median(bench)
    result = {"variant": args.variant, "batch": args.batch, "d_sae": args.d_sae, "loop_tokens_per_s": loop,
              "benchmark_tokens_per_s": bench, "overhead": overhead, "same_step_overhead": same_step}
    print(f"{args.variant}: saelab-train {', '.join(f'{v:,.0f}' for v in loop)} tok/s; train_step.py "
          f"{', '.join(f'{v:,.0f}' for v in bench)} tok/s (interleaved); loop overhead {100 * overhead:.1f}% "
          "(median against median); same-step overhead per run "
          f"{', '.join(f'{100 * v:.1f}%' for v in same_step)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
