"""The activation store's read and build rates (issue #34); every ratio is against a baseline measured in this run.

    .venv/bin/python -m benchmarks.store_read [--gb 1] [--rss-gb 4] [--skip s3,saelens,step,build,rss] [--json OUT]

Read. Caches of random activations (d 384, 128-token windows: reading does not care what the values are) are built
by saelab's own builder, float32 and bfloat16, --gb each at float32 size, and read as training reads them
(CacheReader.epoch: shards fetched -- and from an object store checksummed -- in background threads, groups of
65,536 rows permuted and widened to float32) from local disk and from a local S3 server (SeaweedFS on loopback,
tests/s3_server.py), each with the OS page cache warm (as just after a build) and cold (emptied before every
measurement, root only: every byte from the disk, as a cache far larger than memory is read). Rates are
activations/s and GB/s of stored bytes, each against:
  (a) raw: the same bytes read by the same process: every shard file read whole, one after another (local); every
      shard object fetched whole by the same s3fs client, FETCH_THREADS at a time (S3). Target >= 0.8 / 0.6.
  (b) SAELens: its ActivationsStore (training's `next(store)`) reading the same float32 activations exported in its
      format (saelab-cache export --format saelens), timed by benchmarks/saelens_cache_read.py in SAELens's venv
      (scripts/saelens_compat/venv.sh; skipped when it is missing). Target >= 2x.
  (c) step: the fastest of saelab's training steps at d 384 x 3072, batch 4096 (benchmarks/train_step.py, relu and
      topk), in activations/s: how far ahead of training the store reads. Target >= 5x.
RSS: resident memory of a fresh process after reading 1 GB and after --rss-gb GB of a --rss-gb GB float32 cache
(bounded if the two are equal: nothing grows with the cache's size).
Build: `saelab-cache build` of MiniLM activations on pydocs (the real model), one process against two workers
started at once (--shard 0/2, --shard 1/2, 1 torch thread each on this 2-core CPU), then --finish; wall clock,
start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from saelab.data import cache as cache_module
from saelab.data.cache import ActivationCache, CacheReader, open_caches
from saelab.data.cache_manifest import Request
from saelab.data.cache_store import Store

REPO = Path(__file__).resolve().parents[1]
D, CTX, HOOK, GROUP = 384, 128, "blocks.0.hook_out", 65_536
REQUEST = Request(10**15, 1, "none", 1024)  # the whole pass; no normalisation to estimate


def random_cache(root: str | Path, gb: float, dtype: str, seed: int = 0) -> CacheReader:
    """A cache of gb GB (at float32 size) of random activations, written by saelab's builder (shards, parts,
    manifest, sha256s), then opened as a run opens it."""
    windows = int(gb * 2**30 / (CTX * D * 4))
    generator = torch.Generator().manual_seed(seed)
    corpus = {"train": torch.randint(1000, 30_000, (windows, CTX), generator=generator),
              "eval": torch.randint(1000, 30_000, (8, CTX), generator=generator)}
    inputs = {"model": "random", "hook": HOOK, "benchmark": f"{gb}-{seed}", "cache_dtype": dtype,
              "special_tokens": {"excluded": []}}
    cache = ActivationCache(root, inputs, D)

    def activations(w: torch.Tensor, hooks: list[str]):
        yield {h: torch.randn(len(w) * CTX, D, generator=generator) for h in hooks}

    return open_caches({HOOK: cache}, REQUEST, lambda: corpus, activations)[HOOK]


def reopen(root: str, inputs: dict[str, Any]) -> CacheReader:
    """The cache with these key inputs opened from `root` (built or copied there), as a run there opens it."""
    cache = ActivationCache(root, inputs, D)
    return open_caches({HOOK: cache}, REQUEST, _no_windows, _no_activations)[HOOK]


def _no_windows():
    raise AssertionError("the benchmark's caches are built before they are read")


def _no_activations(*_):
    raise AssertionError("the benchmark's caches are built before they are read")


def stored_bytes(reader: CacheReader) -> int:
    return sum(shard.entry["bytes"] for shard in reader.train)


def read_rate(reader: CacheReader) -> dict[str, float]:
    """One epoch as training reads it: activations/s and stored GB/s."""
    start, rows = time.perf_counter(), 0
    for group in reader.epoch(torch.Generator().manual_seed(0), GROUP):
        rows += len(group)
    seconds = time.perf_counter() - start
    return {"activations_per_s": rows / seconds, "gb_per_s": stored_bytes(reader) / seconds / 1e9}


def raw_rate(reader: CacheReader) -> float:
    """The same shards' bytes read whole by this process, in GB/s: files one after another, objects
    FETCH_THREADS at a time with the same client the reader uses."""
    files = reader.train[0].files
    names = [shard.entry["file"] for shard in reader.train]
    start = time.perf_counter()
    if files.local:
        total = sum(len(files.local_path(name).read_bytes()) for name in names)
    else:
        with ThreadPoolExecutor(cache_module.FETCH_THREADS) as pool:
            total = sum(len(blob) for blob in pool.map(files.read_bytes, names))
    return total / (time.perf_counter() - start) / 1e9


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _ready(state: str) -> bool:
    """Before a measurement: `cold` empties the OS page cache (root only), so every byte comes from the disk
    (the S3 server's volume files included), as a cache far larger than memory is read."""
    if state == "cold":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def best_of(runs: int, measure):
    """The fastest of a few runs: this VM's speed drifts, and the first run also warms caches."""
    results = [measure() for _ in range(runs)]
    return max(results, key=lambda r: r["gb_per_s"] if isinstance(r, dict) else r)


def reads(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> dict[str, CacheReader]:
    readers = {dtype: random_cache(work / "local", args.gb, dtype) for dtype in ("float32", "bfloat16")}
    locations = {"local": readers}
    server = None
    if "s3" not in args.skip:
        sys.path.insert(0, str(REPO))
        from tests.s3_server import seaweedfs

        server_cm = seaweedfs(work / "seaweedfs")
        server = server_cm.__enter__()
        if isinstance(server, str):
            report["s3_skipped"] = server
            server_cm.__exit__(None, None, None)
            server = None
        else:
            os.environ.update(server.env())
            server.fs().mkdir("bench")
            remote = {}
            for dtype, reader in readers.items():
                name = reader.location.rsplit("/", 1)[1]
                Store("s3://bench/caches").fs.put(str(work / "local" / name), f"bench/caches/{name}", recursive=True)
                remote[dtype] = reopen("s3://bench/caches", reader.manifest["inputs"])
            locations["s3"] = remote
    states = ("warm", "cold") if can_drop_caches() else ("warm",)
    report["cold_skipped"] = None if "cold" in states else "cannot write /proc/sys/vm/drop_caches (not root)"
    try:
        for where, by_dtype in locations.items():
            for dtype, reader in by_dtype.items():
                for state in states:
                    raw = best_of(2, lambda r=reader, s=state: raw_rate(r) if _ready(s) else 0.0)
                    read = best_of(2, lambda r=reader, s=state: read_rate(r) if _ready(s) else {})
                    report["read"].append({"store": where, "dtype": dtype, "page_cache": state, **read,
                                           "raw_gb_per_s": raw, "vs_raw": read["gb_per_s"] / raw,
                                           "gb": stored_bytes(reader) / 1e9})
                    print(f"read {where:5s} {dtype:8s} {state}: {read['activations_per_s']:>12,.0f} act/s "
                          f"{read['gb_per_s']:5.2f} GB/s; raw {raw:5.2f} GB/s; ratio {read['gb_per_s'] / raw:.2f}",
                          flush=True)
    finally:
        if server is not None:
            server_cm.__exit__(None, None, None)
    return readers


def saelens(reader: CacheReader, work: Path, report: dict[str, Any]) -> None:
    venv = Path(os.environ.get("SAELENS_VENV", Path.home() / ".cache/saelab/saelens-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        report["saelens_skipped"] = f"no SAELens venv at {venv} (bash -c 'source scripts/saelens_compat/venv.sh')"
        return
    from saelab.cli.cache_export import export_saelens

    exported = work / "saelens"
    export_saelens(str(reader.location), str(exported))
    out = subprocess.run([str(python), "benchmarks/saelens_cache_read.py", str(exported), "--seconds", "8",
                          "--batch-size", "4096"], cwd=REPO, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        report["saelens_skipped"] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
        return
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    ours = best_of(2, lambda: read_rate(reader))
    report["saelens"] = {"saelens_activations_per_s": theirs["activations_per_s"],
                         "saelab_activations_per_s": ours["activations_per_s"],
                         "ratio": ours["activations_per_s"] / theirs["activations_per_s"], "saelens_run": theirs}
    print(f"SAELens's ActivationsStore on the same float32 activations: {theirs['activations_per_s']:,.0f} act/s; "
          f"saelab {ours['activations_per_s']:,.0f} act/s = {report['saelens']['ratio']:.1f}x", flush=True)


def step(reader: CacheReader, work: Path, report: dict[str, Any]) -> None:
    rates = {}
    for variant in ("relu", "topk"):
        out = work / f"step-{variant}.json"
        subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--variant", variant, "--d-in", "384",
                        "--d-sae", "3072", "--batch", "4096", "--steps", "20", "--json", str(out)], cwd=REPO,
                       check=True, capture_output=True, timeout=900)
        rates[variant] = json.loads(out.read_text())["tokens_per_s"]
    fastest = max(rates, key=rates.get)
    ours = best_of(2, lambda: read_rate(reader))
    report["step"] = {"step_activations_per_s": rates, "fastest": fastest,
                      "read_activations_per_s": ours["activations_per_s"],
                      "ratio": ours["activations_per_s"] / rates[fastest]}
    print(f"fastest step at 384 x 3072, batch 4096: {fastest} {rates[fastest]:,.0f} act/s; the local float32 read "
          f"{ours['activations_per_s']:,.0f} act/s = {report['step']['ratio']:.1f}x", flush=True)


def rss(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    reader = random_cache(work / "rss", args.rss_gb, "float32", seed=1)
    out = subprocess.run([sys.executable, "-m", "benchmarks.store_read", "--rss-probe", str(reader.location)],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=1800)
    report["rss"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"RSS reading a {args.rss_gb:g} GB cache: {report['rss']}", flush=True)
    shutil.rmtree(work / "rss", ignore_errors=True)


def rss_probe(location: str) -> None:
    """(In a fresh process.) RSS after reading 1 GB, and after the whole cache, as training reads it."""

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    root, name = location.rsplit("/", 1)
    manifest = Store(location).read_json("manifest.json")
    reader = reopen(root, manifest["inputs"])
    assert reader.location.endswith(name)
    marks, read, at = {"start_mb": rss_mb()}, 0, 1
    for group in reader.epoch(torch.Generator().manual_seed(0), GROUP):
        read += group.numel() * 4
        if read >= at * 2**30 and f"after_{at}gb_mb" not in marks:
            marks[f"after_{at}gb_mb"] = rss_mb()
            at *= 4
    marks["after_all_mb"], marks["gb_read"] = rss_mb(), read / 2**30
    print(json.dumps(marks))


def build(work: Path, report: dict[str, Any]) -> None:
    overrides = ["data.train_tokens=196608", "eval.tokens=4096"]
    cli = [sys.executable, "-m", "saelab.cli.cache", "build"]
    env1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([*cli, *overrides, f"data.cache={work / 'build1'}"], cwd=REPO, check=True, capture_output=True)
    one = time.perf_counter() - start
    start = time.perf_counter()
    workers = [subprocess.Popen([*cli, f"--shard={i}/2", *overrides, f"data.cache={work / 'build2'}"], cwd=REPO,
                                env=env1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    assert [w.wait() for w in workers] == [0, 0]
    subprocess.run([*cli, "--finish", *overrides, f"data.cache={work / 'build2'}"], cwd=REPO, check=True,
                   capture_output=True)
    two = time.perf_counter() - start
    (manifest,) = [json.loads(p.read_text()) for p in (work / "build2").glob("*/manifest.json")]
    rows = sum(s["rows"] for spec in manifest["streams"].values() for s in spec["shards"])
    same = [json.loads(p.read_text())["streams"] for p in (work / "build1").glob("*/manifest.json")] == \
        [manifest["streams"]]
    report["build"] = {"activations": rows, "one_process_s": one, "two_workers_s": two,
                       "one_process_activations_per_s": rows / one, "two_workers_activations_per_s": rows / two,
                       "speedup": one / two, "identical_shards": same}
    print(f"build {rows:,} MiniLM activations: 1 process {one:.1f} s ({rows / one:,.0f} act/s), 2 workers + finish "
          f"{two:.1f} s ({rows / two:,.0f} act/s), x{one / two:.2f}; identical shards: {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of each read cache at float32 size")
    parser.add_argument("--rss-gb", type=float, default=4.0, help="size of the RSS cache")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: s3,saelens,step,build,rss")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    args.skip = {s for s in args.skip.split(",") if s}
    report: dict[str, Any] = {"read": [], "load_before": os.getloadavg(), "cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="saelab-store-bench-"))
    try:
        readers = reads(args, work, report)
        if "saelens" not in args.skip:
            saelens(readers["float32"], work, report)
        if "step" not in args.skip:
            step(readers["float32"], work, report)
        if "rss" not in args.skip:
            rss(args, work, report)
        if "build" not in args.skip:
            build(work, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
