"""Sweep economy of the activation cache: a 4-job multirun with data.cache=auto vs data.cache=off.

Runs the same Hydra multirun (by default `-m sae.sparsity_coefficient=0.05,0.1,0.2,0.4`) twice through the
real CLI, each in a subprocess with a fresh temporary paths.output_dir (so the auto cache starts empty):
once with data.cache=auto, once with data.cache=off. Prints the wall time of each sweep and how many model
forward passes it ran. Forwards are counted in the child: it runs the CLI through this module, which wraps
saelab.data.activations.window_activations (the one function every activation forward goes through; the
stream and the cache builder both reach it through activation_chunks' module-global lookup) and
saelab.train.train (to split the count by job), then calls saelab.train.main(). The child prints its counts
to stderr as one JSON line; the cache's "building" / "reusing" / "extending" log lines are counted too.
Target: one generation pass for the whole sweep with the cache (the first job builds, three reuse), four
with the cache off.

    .venv/bin/python -m benchmarks.sweep_economy                   # MiniLM (offline default), reduced budget
    .venv/bin/python -m benchmarks.sweep_economy --model tiny [--model-path DIR]   # a tiny local GPT-2
        [--values 0.05,0.1,0.2,0.4] [--only auto|off] [--keep] [-- extra overrides]

Run from the repository root. The MiniLM defaults (data.train_tokens=51200 eval.tokens=8192
eval.spliced_windows=0 logger=none data.batch_size=512, checkpoints every 1000 steps) keep one sweep to a few
minutes on a 2-core CPU; extra overrides after `--` are appended to both sweeps.
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

    import saelab.data.activations as activations
    import saelab.train as train_mod

    counts = {"calls": 0, "windows": 0, "jobs": []}
    forward = activations.window_activations

    def counted(model, windows):
        counts["calls"] += 1
        counts["windows"] += int(windows.shape[0])
        return forward(model, windows)

    activations.window_activations = counted  # activation_chunks looks it up in this module at call time
    train = train_mod.train

    def train_counted(cfg):
        before = (counts["calls"], counts["windows"])
        started = time.perf_counter()
        try:
            return train(cfg)
        finally:
            counts["jobs"].append({"calls": counts["calls"] - before[0], "windows": counts["windows"] - before[1],
                                   "seconds": round(time.perf_counter() - started, 1)})

    train_mod.train = train_counted  # hydra_entry calls train() through the module global
    atexit.register(lambda: print(COUNTS_TAG + json.dumps(counts), file=sys.stderr, flush=True))
    sys.argv = ["saelab-train", *cli_args]
    train_mod.main()


# -- the parent ------------------------------------------------------------------------------------------------
def run_sweep(cache: str, base: list[str], values: str, keep: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"saelab-sweep-{cache}-"))
    args = ["-m", f"sae.sparsity_coefficient={values}", f"data.cache={cache}", f"paths.output_dir={out}", *base]
    cmd = [sys.executable, "-m", "benchmarks.sweep_economy", "--child", "--", *args]
    print(f"[{cache}] {load()}  running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    log_text = proc.stdout + proc.stderr
    (Path(tempfile.gettempdir()) / f"saelab-sweep-{cache}.log").write_text(log_text)
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
        print(f"[{cache}] warning: {len(caches)} different cache keys in one sweep ({', '.join(sorted(caches))});"
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
        print(f"[{cache}] kept {out}", file=sys.stderr)
    result = {"cache": cache, "wall_s": wall, "rc": proc.returncode, "counts": counts, "lines": lines,
              "keys": len(caches),
              "jobs_ok": len(metrics), "jobs_failed": len(errors), "load_after": load()}
    print(f"[{cache}] done in {wall:.0f} s, {result['load_after']}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    if "--child" in sys.argv[1:2]:
        rest = sys.argv[2:]
        child(rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--model-path", type=Path, help="tiny: an existing HF model dir (default: build one)")
    parser.add_argument("--values", default="0.05,0.1,0.2,0.4", help="sae.sparsity_coefficient sweep values")
    parser.add_argument("--only", choices=("auto", "off"), help="run one of the two sweeps only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output directories")
    parser.add_argument("extra", nargs="*", help="extra overrides for both sweeps (after --)")
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
        results = [run_sweep(cache, base, args.values, args.keep)
                   for cache in ("auto", "off") if args.only in (None, cache)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n_jobs = len(args.values.split(","))
    print(f"\nsweep: {n_jobs} jobs, sae.sparsity_coefficient={args.values}, model {args.model}")
    print(f"{'data.cache':<11}{'wall s':>8}{'jobs ok':>9}{'fwd calls':>11}{'windows':>9}"
          f"{'jobs w/ fwd':>13}  {'cache log lines':<36}{'load after'}")
    for r in results:
        c = r["counts"] or {"calls": -1, "windows": -1, "jobs": []}
        with_fwd = sum(1 for j in c["jobs"] if j["calls"])
        lines = " ".join(f"{k} {v}" for k, v in r["lines"].items() if v or k in ("building", "reusing"))
        lines += f" ({r['keys']} key{'s' if r['keys'] != 1 else ''})" if r["keys"] else ""
        print(f"{r['cache']:<11}{r['wall_s']:>8.0f}{r['jobs_ok']:>6}/{n_jobs:<2}{c['calls']:>11}{c['windows']:>9}"
              f"{with_fwd:>10}/{n_jobs:<2}  {lines:<36}{r['load_after']}")
        per_job = ", ".join(f"job{i}: {j['calls']} calls/{j['windows']} win/{j['seconds']:.0f} s"
                            for i, j in enumerate(c["jobs"]))
        print(f"{'':<11}per job: {per_job}")
    if len(results) == 2 and all(r["counts"] for r in results):
        auto, off = results
        if auto["counts"]["windows"]:
            print(f"cache=auto: {off['wall_s'] / auto['wall_s']:.2f}x faster, "
                  f"{off['counts']['windows'] / auto['counts']['windows']:.2f}x fewer windows forwarded")
    if any(r["rc"] or r["jobs_failed"] or r["counts"] is None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
