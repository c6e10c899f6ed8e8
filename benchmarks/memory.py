"""Peak memory of a training run at 1x and 10x the token budget with the same shuffle buffer.

With data.cache=off activations stream from the model through the bounded shuffle buffer
(data.buffer_tokens), so a run's memory should not depend on its token budget: this runs `saelab.cli.train`
(the real CLI) in a subprocess at --budget and at --factor x --budget, everything else equal, and prints each
child's peak RSS (ru_maxrss from os.wait4 on that child alone) and their ratio. Target: within 10%.

A peak can be set during set-up (model load, tokenising the corpus) and hide a slow leak below it, so the
child's RSS is also sampled with psutil every 0.2 s and the table shows the largest sample in the second
half of the run (training) next to the peak.

By default it runs a tiny random GPT-2 (tests.conftest.build_tiny_model, d_model --d-model) on a generated
corpus of synthetic sentences (data=text_files), both built in a temp dir, with 204,800 vs 2,048,000 tokens:
a few minutes on a loaded 2-core CPU. `--model minilm` runs the offline default (MiniLM, pydocs) with
20,480 vs 204,800 tokens instead (slower: generation is the bottleneck). `--cache auto` (or `both`) also
measures runs with the activation cache on, each building its own cache in a fresh output dir; RSS then
includes the memory-mapped shard pages the run has touched (file-backed, reclaimable).

    .venv/bin/python -m benchmarks.memory [--model tiny|minilm] [--model-path DIR] [--budget N] [--factor 10]
        [--buffer-tokens 65536] [--cache off|auto|both] [--d-model 64] [-- extra overrides]

Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.sweep_economy import REPO, child_env, load, tiny_assets, tiny_overrides

MINILM = ["eval.tokens=8192", "eval.spliced_windows=0", "logger=none", "data.batch_size=512"]
COMMON = ["callbacks.progress_bar.refresh_rate=0", "callbacks.model_checkpoint.every_n_train_steps=100000"]


def measure(args: list[str], label: str) -> dict:
    """Run the CLI with `args` in a child; its peak RSS (wait4) and psutil RSS samples."""
    import psutil

    out = Path(tempfile.mkdtemp(prefix="saelab-memory-"))
    cmd = [sys.executable, "-m", "saelab.cli.train", f"paths.output_dir={out}", *args]
    print(f"[{label}] {load()}  running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    log_path = Path(tempfile.gettempdir()) / f"saelab-memory-{label}.log"
    samples: list[tuple[float, int, int]] = []  # (seconds, rss, rss - shared: anonymous memory)
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log_file, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            try:
                process = psutil.Process(proc.pid)
                while not done.is_set():
                    info = process.memory_info()
                    samples.append((time.perf_counter() - started, info.rss, info.rss - info.shared))
                    done.wait(0.2)
            except psutil.Error:  # the child has exited
                pass

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    metrics = list(out.glob("**/metrics.json"))
    if proc.returncode != 0 or not metrics:
        print(log_path.read_text()[-4000:], file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    late = [(rss, anon) for t, rss, anon in samples if t >= wall / 2]
    result = {"label": label, "rc": proc.returncode, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024,
              "late_mb": max(r for r, _ in late) / 2**20 if late else float("nan"),
              "late_anon_mb": max(a for _, a in late) / 2**20 if late else float("nan"), "load_after": load()}
    print(f"[{label}] done in {wall:.0f} s: peak RSS {result['peak_mb']:.0f} MB, {result['load_after']} "
          f"(log {log_path})", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--model-path", type=Path, help="tiny: an existing HF model dir (default: build one)")
    parser.add_argument("--d-model", type=int, default=64, help="tiny: width of the model built (default 64)")
    parser.add_argument("--budget", type=float, help="1x data.train_tokens (tiny 204800, minilm 20480)")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--buffer-tokens", type=int, default=65_536, help="data.buffer_tokens for every run")
    parser.add_argument("--cache", choices=("off", "auto", "both"), default="off")
    parser.add_argument("extra", nargs="*", help="extra overrides for every run (after --)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="saelab-memory-assets-"))
    try:
        if args.model == "tiny":
            model_path, corpus = tiny_assets(scratch, args.model_path, d_model=args.d_model, documents=2000)
            base = [*tiny_overrides(model_path, corpus), "data.batch_size=512", "data.model_batch_size=64"]
            budget = int(args.budget or 204_800)
        else:
            base = list(MINILM)
            budget = int(args.budget or 20_480)
        base += [*COMMON, f"data.buffer_tokens={args.buffer_tokens}", *args.extra]
        base = list({o.split("=")[0]: o for o in base}.values())  # one value per key: the last one given
        base = [o for o in base if not o.startswith("data.train_tokens=")]  # set per run below
        print(f"{load()}  cpus {os.cpu_count()}  model {args.model}  overrides: {' '.join(base)}", file=sys.stderr)
        modes = ("off", "auto") if args.cache == "both" else (args.cache,)
        results = []
        for mode in modes:
            for factor in (1, args.factor):
                tokens = budget * factor
                results.append({**measure([*base, f"data.cache={mode}", f"data.train_tokens={tokens}"],
                                          f"{args.model}-cache_{mode}-{factor}x"),
                                "cache": mode, "factor": factor, "tokens": tokens})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nmodel {args.model}, data.buffer_tokens={args.buffer_tokens}; peak RSS = ru_maxrss of the child; "
          "late = largest psutil sample in the run's second half; anon = late RSS minus file-backed/shared pages")
    print(f"{'data.cache':<11}{'budget':>6}{'train_tokens':>14}{'wall s':>8}{'peak MB':>9}{'late MB':>9}"
          f"{'anon MB':>9}  load after")
    for r in results:
        print(f"{r['cache']:<11}{str(r['factor']) + 'x':>6}{r['tokens']:>14,}{r['wall_s']:>8.0f}{r['peak_mb']:>9.0f}"
              f"{r['late_mb']:>9.0f}{r['late_anon_mb']:>9.0f}  {r['load_after']}")
    failed = False
    for mode in modes:
        small, large = (r for r in results if r["cache"] == mode)
        failed |= bool(small["rc"] or large["rc"])
        ratio = large["peak_mb"] / small["peak_mb"]
        late = large["late_mb"] / small["late_mb"]
        anon = large["late_anon_mb"] / small["late_anon_mb"]
        verdict = "within 10%" if abs(ratio - 1) <= 0.10 else "NOT within 10%"
        print(f"data.cache={mode}: peak {args.factor}x/1x = {ratio:.3f} ({verdict}); late {late:.3f}; "
              f"late anon {anon:.3f}{'' if not (small['rc'] or large['rc']) else '  (a run FAILED: see its log)'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
