"""Streamed training throughput with the model's next forwards read ahead (data.prefetch_batches) vs inline.

    .venv/bin/python -m benchmarks.stream_prefetch [--tokens 102400] [--depths 0 2] [--repeats 1] [--json OUT]
        [-- extra overrides]

Runs the main job (MiniLM, the offline default) with `data.cache=off` once per depth and repeat, interleaved
(0, 2, 0, 2, ...) so that this VM's drift falls on both alike, through the real CLI in a fresh process each. The
figure is the training phase's own throughput, tokens trained / the "training N s" of the run's log line (set-up
and evaluation excluded: they do not read ahead), and the ratio of each depth's median to the first depth's (the
inline baseline, 0) in the same run. Each run also carries benchmarks/loop_overhead.py's StepTimer, which splits
the steps' wall time into the SAEs' own work (loss, backward, Adam) and the rest (waiting for the next batch: the
forward when it runs inline, the shuffle buffer, logging). Held-out evaluation is cut (eval.tokens=8192, no
spliced metrics) to keep a run short; it is outside the timed phase anyway. Record `uptime` with the figures: they
are CPU timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = re.compile(r"set-up ([\d.]+) s, training ([\d.]+) s \((\d+) steps\), evaluation ([\d.]+) s")


def load() -> str:
    """The load averages (1, 5, 15 min), as `uptime` prints them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_once(depth: int, tokens: int, out_dir: Path, extra: list[str]) -> dict:
    """One streamed training run; its phase times, steps and training tokens/s."""
    timer = out_dir / "step_timer.json"
    args = ["data.cache=off", f"data.train_tokens={tokens}", f"data.prefetch_batches={depth}", "logger=csv",
            "eval.tokens=8192", "eval.spliced_windows=0", "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={out_dir}", "+callbacks.step_timer._target_=benchmarks.loop_overhead.StepTimer",
            f"+callbacks.step_timer.path={timer}", *extra]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, text=True,
                            capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - started
    found = PHASES.search(result.stdout + result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"saelab-train {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    setup, training, steps, evaluation = float(found[1]), float(found[2]), int(found[3]), float(found[4])
    batch = int(next((a.split("=", 1)[1] for a in extra if a.startswith("data.batch_size=")), 512))
    timings = json.loads(timer.read_text())
    sae_s = sum(timings["step_s"])
    return {"depth": depth, "setup_s": setup, "training_s": training, "steps": steps, "evaluation_s": evaluation,
            "wall_s": wall, "train_tokens_per_s": steps * batch / training, "sae_step_s": sae_s,
            "between_steps_s": sum(timings["period_s"]) - sae_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=102_400, help="data.train_tokens of each run")
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 2], help="data.prefetch_batches; first: baseline")
    parser.add_argument("--repeats", type=int, default=1, help="runs per depth, interleaved")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("extra", nargs="*", help="overrides for every run (data.batch_size=... is read back)")
    args = parser.parse_args()

    report: dict = {"tokens": args.tokens, "depths": args.depths, "extra": args.extra, "load_before": load(),
                    "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for depth in args.depths:
                run = run_once(depth, args.tokens, Path(tmp) / f"d{depth}_r{repeat}", args.extra)
                report["runs"].append(run)
                print(f"prefetch_batches={depth}: training {run['training_s']:.1f} s for {run['steps']} steps, "
                      f"{run['train_tokens_per_s']:,.0f} tok/s; of it SAE steps {run['sae_step_s']:.1f} s, waiting for "
                      f"batches and the rest {run['between_steps_s']:.1f} s (set-up {run['setup_s']:.1f} s, wall "
                      f"{run['wall_s']:.1f} s; load {load()})", flush=True)
    report["load_after"] = load()
    medians = {d: statistics.median(r["train_tokens_per_s"] for r in report["runs"] if r["depth"] == d)
               for d in args.depths}
    base = args.depths[0]
    report["median_tokens_per_s"] = medians
    report["ratio_to_baseline"] = {d: medians[d] / medians[base] for d in args.depths}
    for depth in args.depths:
        print(f"prefetch_batches={depth}: median {medians[depth]:,.0f} tok/s, x{medians[depth] / medians[base]:.3f} "
              f"vs prefetch_batches={base}")
    print(f"load before {report['load_before']}, after {report['load_after']} ({report['cpus']} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
