"""Sweep economy: what a multirun pays for its activations, through the real CLI.

Two comparisons, each measured within one run of this script:

- `--launcher basic` (default): the same 4-job multirun (`-m sae.sparsity_coefficient=0.05,0.1,0.2,0.4`)
  under Hydra's basic launcher, once with data.cache=auto (from an empty cache) and once with data.cache=off.
- `--launcher fanout`: an 8-job multirun (four variants x two sparsity levels, `+point=<variant>_<sparse|dense>`)
  under the basic launcher and under `hydra/launcher=fanout`, streamed (data.cache=off) and from a warm cache
  (built once beforehand by `saelab-cache build`, not timed). Prints wall times, model forward passes and the
  time split: activations (inside the model forward), training steps (inside Trainer.fit, activations
  excluded), evaluation (held-out and spliced metrics; the default eval.spliced_windows=64 unless
  --spliced-windows says otherwise), and start-up + other (the rest: interpreter and imports, Hydra, model
  loading, cache reads, exports).

Every sweep runs in a subprocess with a fresh temporary paths.output_dir. Forwards and times are counted in
the child: it runs the CLI through this module, which wraps saelab.data.activations.window_activations (the
one function every activation forward goes through), lightning's Trainer.fit, saelab.run.training._evaluate and
saelab.run.training.train_group (one entry per group: per job under the basic launcher), then calls
saelab.cli.train.main(). The child prints its counts to stderr as one JSON line; the cache's "building" /
"reusing" / "extending" log lines are counted too.

    .venv/bin/python -m benchmarks.sweep_economy [--launcher basic|fanout]  # MiniLM (offline default)
    .venv/bin/python -m benchmarks.sweep_economy --model tiny [--model-path DIR]   # a tiny local GPT-2
        [--values 0.05,0.1,0.2,0.4] [--points relu_sparse,...] [--keep] [-- extra overrides]

Run from the repository root. The MiniLM defaults (data.train_tokens=51200 eval.tokens=8192
eval.spliced_windows=0 logger=none data.batch_size=512, checkpoints every 1000 steps) keep one sweep to a few
minutes on a 2-core CPU; extra overrides after `--` are appended to every sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COUNTS_TAG = "SWEEP_ECONOMY_COUNTS "
CACHE_LINE = re.compile(
    r"activation cache: (building|reusing|extending|waiting)(?: for another job to finish with)? (\S+)")

MINILM = [
    "data.train_tokens=51200", "eval.tokens=8192", "eval.spliced_windows=0", "logger=none",
    "data.batch_size=512", "callbacks.model_checkpoint.every_n_train_steps=1000",
    "callbacks.progress_bar.refresh_rate=0",
]


def tiny_assets(directory: Path, model_path: Path | None = None, d_model: int = 32, documents: int = 1000
                ) -> tuple[Path, Path]:
    """(model dir, corpus dir) for a tiny local run: tests.conftest's random GPT-2 and synthetic sentences."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model, synthetic_sentences

    if model_path is None:
        model_path = directory / "tiny_model"
        model_path.mkdir(parents=True, exist_ok=True)
        build_tiny_model(model_path, d_model=d_model)
    corpus = directory / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    sentences = synthetic_sentences(10 * documents, seed=1)
    for i in range(documents):
        (corpus / f"doc{i:05d}.txt").write_text(" ".join(sentences[10 * i : 10 * i + 10]))
    return Path(model_path), corpus


def tiny_d_model(model_path: Path) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("n_embd") or config["hidden_size"])


def tiny_overrides(model_path: Path, corpus: Path) -> list[str]:
    return [
        "model=tiny", f"model.path={model_path}", f"model.d_model={tiny_d_model(model_path)}",
        "data=text_files", f"data.path={corpus}", "data.context_size=32", "data.batch_size=256",
        "data.buffer_tokens=2048", "data.model_batch_size=16", "data.normalize_tokens=1024",
        "data.train_tokens=25600", "eval.tokens=2048", "eval.batch_size=512", "eval.spliced_windows=0",
        "sae.expansion_factor=4", "logger=none", "callbacks.progress_bar.refresh_rate=0",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
    ]


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false"}


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the child: the real CLI with forward passes counted -------------------------------------------------------
def child(cli_args: list[str]) -> None:
    import atexit

    import lightning

    import saelab.cli.train as train_mod
    import saelab.data.activations as activations
    import saelab.run.training as group_mod

    started = time.perf_counter()
    counts = {"calls": 0, "windows": 0, "jobs": [], "seconds": {"activations": 0.0, "fit": 0.0, "fit_activations": 0.0,
                                                                "evaluation": 0.0}}
    in_fit = [False]
    forward = activations.window_activations

    def counted(model, windows, *args, **kwargs):
        counts["calls"] += 1
        counts["windows"] += int(windows.shape[0])
        t0 = time.perf_counter()
        try:
            return forward(model, windows, *args, **kwargs)
        finally:
            counts["seconds"]["activations"] += time.perf_counter() - t0
            if in_fit[0]:
                counts["seconds"]["fit_activations"] += time.perf_counter() - t0

    activations.window_activations = counted  # activation_chunks looks it up in this module at call time
    fit = lightning.Trainer.fit

    def fit_timed(self, *args, **kwargs):
        t0, in_fit[0] = time.perf_counter(), True
        try:
            return fit(self, *args, **kwargs)
        finally:
            in_fit[0] = False
            counts["seconds"]["fit"] += time.perf_counter() - t0

    lightning.Trainer.fit = fit_timed
    evaluate = group_mod._evaluate

    def evaluate_timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            counts["seconds"]["evaluation"] += time.perf_counter() - t0

    group_mod._evaluate = evaluate_timed
    train_group = group_mod.train_group

    def train_group_counted(jobs):  # one entry per group (the basic launcher: one per job)
        before = (counts["calls"], counts["windows"])
        t0 = time.perf_counter()
        try:
            return train_group(jobs)
        finally:
            counts["jobs"].append({"n_jobs": len(jobs), "calls": counts["calls"] - before[0],
                                   "windows": counts["windows"] - before[1],
                                   "seconds": round(time.perf_counter() - t0, 1)})

    # saelab.cli.train holds its own reference; the fan-out launcher imports it from saelab.run.training when it runs.
    group_mod.train_group = train_mod.train_group = train_group_counted

    def report() -> None:
        counts["seconds"]["wall"] = time.perf_counter() - started
        print(COUNTS_TAG + json.dumps(counts), file=sys.stderr, flush=True)

    atexit.register(report)
    sys.argv = ["saelab-train", *cli_args]
    train_mod.main()


# -- the parent ------------------------------------------------------------------------------------------------
def run_sweep(label: str, sweep_args: list[str], base: list[str], keep: bool, out: Path | None = None) -> dict:
    """One multirun in a child process: its wall time, counts, cache log lines and job outcomes."""
    out = out or Path(tempfile.mkdtemp(prefix=f"saelab-sweep-{label}-"))
    args = ["-m", *sweep_args, f"paths.output_dir={out}", *base]
    cmd = [sys.executable, "-m", "benchmarks.sweep_economy", "--child", "--", *args]
    print(f"[{label}] {load()}  running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    log_text = proc.stdout + proc.stderr
    (Path(tempfile.gettempdir()) / f"saelab-sweep-{label}.log").write_text(log_text)
    counts = None
    for line in proc.stderr.splitlines():
        if line.startswith(COUNTS_TAG):
            counts = json.loads(line[len(COUNTS_TAG):])
    lines = {kind: 0 for kind in ("building", "reusing", "extending", "waiting")}
    caches = set()
    for match in CACHE_LINE.finditer(log_text):
        lines[match.group(1)] += 1
        caches.add(Path(match.group(2)).name)
    if len(caches) > 1:  # the key hashes saelab's data code: an edit to src/ mid-sweep starts a new cache
        print(f"[{label}] warning: {len(caches)} different cache keys in one sweep ({', '.join(sorted(caches))});"
              " was src/saelab/data edited while it ran?", file=sys.stderr)
    metrics = sorted(out.glob("multirun/*/*/*/metrics.json"))
    errors = sorted(out.glob("multirun/*/*/*/error.txt"))
    if proc.returncode != 0 or counts is None or errors:
        print(log_text[-4000:], file=sys.stderr)
        for err in errors:
            print(err, err.read_text()[-2000:], file=sys.stderr)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"[{label}] kept {out}", file=sys.stderr)
    result = {"label": label, "wall_s": wall, "rc": proc.returncode, "counts": counts, "lines": lines,
              "keys": len(caches), "jobs_ok": len(metrics), "jobs_failed": len(errors), "load_after": load()}
    print(f"[{label}] done in {wall:.0f} s, {result['load_after']}", file=sys.stderr, flush=True)
    return result


def cache_comparison(base: list[str], values: str, keep: bool) -> list[dict]:
    """The basic launcher's sweep with data.cache=auto (from an empty cache) and with data.cache=off."""
    sweep = [f"sae.sparsity_coefficient={values}"]
    results = [run_sweep(cache, [*sweep, f"data.cache={cache}"], base, keep) for cache in ("auto", "off")]
    n_jobs = len(values.split(","))
    print(f"\nsweep: {n_jobs} jobs, sae.sparsity_coefficient={values}")
    print(f"{'data.cache':<11}{'wall s':>8}{'jobs ok':>9}{'fwd calls':>11}{'windows':>9}"
          f"{'jobs w/ fwd':>13}  {'cache log lines':<36}{'load after'}")
    for r in results:
        c = r["counts"] or {"calls": -1, "windows": -1, "jobs": []}
        with_fwd = sum(1 for j in c["jobs"] if j["calls"])
        lines = " ".join(f"{k} {v}" for k, v in r["lines"].items() if v or k in ("building", "reusing"))
        lines += f" ({r['keys']} key{'s' if r['keys'] != 1 else ''})" if r["keys"] else ""
        print(f"{r['label']:<11}{r['wall_s']:>8.0f}{r['jobs_ok']:>6}/{n_jobs:<2}{c['calls']:>11}{c['windows']:>9}"
              f"{with_fwd:>10}/{n_jobs:<2}  {lines:<36}{r['load_after']}")
        per_job = ", ".join(f"job{i}: {j['calls']} calls/{j['windows']} win/{j['seconds']:.0f} s"
                            for i, j in enumerate(c["jobs"]))
        print(f"{'':<11}per job: {per_job}")
    auto, off = results
    if auto["counts"] and off["counts"] and auto["counts"]["windows"]:
        print(f"cache=auto: {off['wall_s'] / auto['wall_s']:.2f}x faster, "
              f"{off['counts']['windows'] / auto['counts']['windows']:.2f}x fewer windows forwarded")
    return results


def launcher_comparison(base: list[str], points: str, keep: bool, spliced: int = 64) -> list[dict]:
    """The same sweep through Hydra's basic launcher and through hydra/launcher=fanout, streamed
    (data.cache=off) and from a warm cache, all in this run."""
    sweep = [f"+point={points}"]
    # The default evaluation (spliced metrics on eval.spliced_windows=64 held-out windows), as a user's sweep
    # runs it: the fan-out shares its clean and zero-ablated passes. --spliced-windows changes it.
    base = [a for a in base if not a.startswith("eval.spliced_windows=")] + [f"eval.spliced_windows={spliced}"]
    scratch = Path(tempfile.mkdtemp(prefix="saelab-sweep-cache-"))
    cache = [f"paths.cache_dir={scratch}"]
    results = []
    try:
        for launcher in ("basic", "fanout"):
            results.append(run_sweep(f"off/{launcher}".replace("/", "-"), [*sweep, "data.cache=off",
                                     f"hydra/launcher={launcher}"], [*base, *cache], keep))
        # Warm the cache once (not timed), then both launchers read it.
        build = subprocess.run([sys.executable, "-m", "saelab.cli.cache", "build", *base, *cache,
                                "data.cache=auto"], cwd=REPO, env=child_env(), capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(build.stderr[-3000:])
        for launcher in ("basic", "fanout"):
            results.append(run_sweep(f"warm/{launcher}".replace("/", "-"), [*sweep, "data.cache=auto",
                                     f"hydra/launcher={launcher}"], [*base, *cache], keep))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n_jobs = len(points.split(","))
    print(f"\nsweep: {n_jobs} jobs, +point={points}")
    print(f"{'run':<14}{'wall s':>8}{'jobs ok':>9}{'groups':>8}{'fwd calls':>11}{'windows':>9}   "
          f"time split (s): start-up+other / activations / training steps / evaluation   load after")
    for r in results:
        c = r["counts"] or {"calls": -1, "windows": -1, "jobs": [], "seconds": {}}
        t = c.get("seconds", {})
        steps = t.get("fit", 0.0) - t.get("fit_activations", 0.0)
        other = r["wall_s"] - t.get("activations", 0.0) - steps - t.get("evaluation", 0.0)
        print(f"{r['label']:<14}{r['wall_s']:>8.0f}{r['jobs_ok']:>6}/{n_jobs:<2}{len(c['jobs']):>8}{c['calls']:>11}"
              f"{c['windows']:>9}   {other:>6.1f} / {t.get('activations', 0.0):>6.1f} / {steps:>6.1f} / "
              f"{t.get('evaluation', 0.0):>6.1f}   {r['load_after']}")
    for mode in ("off", "warm"):
        basic, fanout = (r for r in results if r["label"].startswith(mode))
        if basic["counts"] and fanout["counts"]:
            ratio = basic["counts"]["windows"] / max(fanout["counts"]["windows"], 1)
            print(f"{'streamed' if mode == 'off' else 'warm cache'}: fanout {basic['wall_s'] / fanout['wall_s']:.2f}x "
                  f"faster than basic; windows forwarded {fanout['counts']['windows']} vs {basic['counts']['windows']}"
                  + (f" ({ratio:.1f}x fewer)" if fanout["counts"]["windows"] else ""))
    return results


def main() -> None:
    if "--child" in sys.argv[1:2]:
        rest = sys.argv[2:]
        child(rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=("basic", "fanout"), default="basic",
                        help="basic: data.cache=auto vs off under the basic launcher; fanout: basic vs fanout "
                             "launcher on an 8-job sweep, streamed and with a warm cache")
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--model-path", type=Path, help="tiny: an existing HF model dir (default: build one)")
    parser.add_argument("--values", default="0.05,0.1,0.2,0.4", help="basic: sae.sparsity_coefficient values")
    parser.add_argument("--points", default=",".join(f"{v}_{s}" for v in ("relu", "gated", "jumprelu", "topk")
                                                      for s in ("sparse", "dense")),
                        help="fanout: the conf/point/ configs swept (default: four variants x two sparsities)")
    parser.add_argument("--spliced-windows", type=int, default=64,
                        help="fanout: eval.spliced_windows of every job (default 64, the main job's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output directories")
    parser.add_argument("extra", nargs="*", help="extra overrides for every sweep (after --)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="saelab-sweep-assets-"))
    try:
        if args.model == "tiny":
            model_path, corpus = tiny_assets(scratch, args.model_path)
            base = tiny_overrides(model_path, corpus)
        else:
            base = list(MINILM)
        base += args.extra
        print(f"{load()}  cpus {os.cpu_count()}  model {args.model}  overrides: {' '.join(base)}", file=sys.stderr)
        if args.launcher == "fanout":
            results = launcher_comparison(base, args.points, args.keep, args.spliced_windows)
        else:
            results = cache_comparison(base, args.values, args.keep)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if any(r["rc"] or r["jobs_failed"] or r["counts"] is None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
