"""The Python half of benchmarks/gpu_check.sh: run its step grid, read its training sweep, print its report.

    python -m benchmarks.gpu_check steps  --jsonl F --device cuda --shapes 768x24576,2304x65536 [--budget-s S] ...
    python -m benchmarks.gpu_check steps  --jsonl F --device cuda --large jumprelu:2304x262144:16384,...
    python -m benchmarks.gpu_check libraries --jsonl F --device cuda --shapes ... [--budget-s S]
    python -m benchmarks.gpu_check report --steps-jsonl F [--libraries-jsonl F] [--sweep DIR] [--parts TSV]
        [--out FILE] [--quality-json FILE]

`steps` runs benchmarks/train_step.py's main() for every (shape, precision, variant) in one process (a
process per run would spend more time importing than measuring), one JSON line per run. A run that raises
is recorded as failed and the grid goes on; a run that kills the process (a CUDA fault) is left as
"started", so the shell starts the command again, which records it as crashed and continues after it. Runs
that would start past --budget-s are recorded as skipped. `libraries` does the same for SAELens's step
(benchmarks/saelens_step.py) and sparsify's (benchmarks/sparsify_step.py), each where it imports. `report`
needs no torch: it reads those lines, the parts' status and the training sweep's metrics.json files, and
prints the tables.

`steps --large` runs the shapes at which 32-bit offsets and grid limits would break (issue #24), each
`variant:d_inxd_sae:batch`, as lean runs (saelab's step alone: no roofline or reference, which would need its
memory again) with a slice of one step checked against plain torch (benchmarks/slice_check.py); the report
gives them their own table. A run that does not fit the GPU is recorded as failed (out of memory).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

VARIANTS = ("relu", "gated", "jumprelu", "topk", "batchtopk")
STEP_PRECISIONS = ("bf16", "tf32", "fp32")  # the slowest (fp32 at the large shape) last: first to go if time runs out
TRAIN_PRECISIONS = ("32-true", "tf32", "bf16-mixed")
SAELENS_VARIANTS = ("standard", "gated", "jumprelu", "topk")
SAELENS_PRECISIONS = ("fp32", "bf16")
QUALITY_TOLERANCE = 0.02  # FVU and L0 of tf32 / bf16-mixed within 2% of 32-true
# B x d_sae = 2^32 at d_in 2,304 (JumpReLU ~66 GiB: an H100 holds it); 2^20 latents at d_in 2,304 (d_sae x d_in
# > 2^31: the sparse backward's store offsets; ~95 GiB with Adam: an H200)
LARGE = "jumprelu:2304x262144:16384,relu:2304x262144:16384,topk:2304x1048576:4096"


# -- the step grid -------------------------------------------------------------------------------------------
def shape(text: str) -> tuple[int, int]:
    d_in, d_sae = text.lower().split("x")
    return int(d_in), int(d_sae)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed process
            continue
    return records


def append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each run's last record (a "started" one means the process died during that run)."""
    return {r["run"]: r for r in records}


def run_grid(jsonl: Path, runs: list[tuple[str, dict[str, Any], list[str]]], call, budget_s: float) -> int:
    """Run call(argv) for each (run id, labels, argv) not yet in `jsonl`; returns how many failed."""
    done = latest(read_lines(jsonl))
    for run_id, record in done.items():
        if record["status"] == "started":
            append(jsonl, {**record, "status": "crashed", "error": "the process died during this run"})
            done[run_id] = {"status": "crashed"}
    start, failed = time.monotonic(), 0
    for run_id, labels, argv in runs:
        if run_id in done:
            continue
        if time.monotonic() - start > budget_s:
            append(jsonl, {"run": run_id, **labels, "status": "skipped", "error": "time budget"})
            continue
        append(jsonl, {"run": run_id, **labels, "status": "started"})
        try:
            result = call(argv)
        except BaseException as err:  # noqa: BLE001 (SystemExit from argparse too): recorded, the grid goes on
            failed += 1
            detail = traceback.format_exc(limit=3)
            append(jsonl, {"run": run_id, **labels, "status": "failed", "error": f"{type(err).__name__}: {err}",
                           "traceback": detail})
            if isinstance(err, KeyboardInterrupt):
                raise
            continue
        append(jsonl, {"run": run_id, **labels, "status": "ok", "result": result})
    return failed


def step_runs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], list[str]]]:
    runs = []
    for text in args.shapes.split(","):
        d_in, d_sae = shape(text)
        for precision in args.precisions.split(","):
            for variant in args.variants.split(","):
                labels = {"shape": f"{d_in}x{d_sae}", "variant": variant, "precision": precision}
                argv = ["--variant", variant, "--d-in", str(d_in), "--d-sae", str(d_sae), "--batch", str(args.batch),
                        "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device,
                        "--precision", precision, "--reference", "--sync-steps", str(args.sync_steps)]
                runs.append((f"{variant} {d_in}x{d_sae} {precision}", labels, argv))
    return runs


def large_runs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], list[str]]]:
    """One lean tf32 run per `variant:d_inxd_sae:batch` of --large, with the slice check."""
    runs = []
    for spec in args.large.split(","):
        variant, dims, batch = spec.split(":")
        d_in, d_sae = shape(dims)
        labels = {"shape": f"{d_in}x{d_sae}", "variant": variant, "precision": "tf32", "batch": int(batch),
                  "large": True}
        argv = ["--variant", variant, "--d-in", str(d_in), "--d-sae", str(d_sae), "--batch", batch, "--warmup",
                str(args.warmup), "--steps", str(args.steps), "--device", args.device, "--precision", "tf32",
                "--lean", "--check-slice"]
        runs.append((f"large {variant} {d_in}x{d_sae} b{batch}", labels, argv))
    return runs


def library_runs(args: argparse.Namespace, jsonl: Path) -> tuple[list[tuple[str, dict[str, Any], list[str]]], Any]:
    """SAELens's four variants in fp32 and bf16, and sparsify's TopK, at each shape; the first argument of each
    run names its module. A library that does not import gets one failed record saying why."""
    modules = {}
    for name, package in (("saelens_step", "sae_lens"), ("sparsify_step", "sparsify")):
        record = {"run": name, "variant": name.removesuffix("_step")}
        if importlib.util.find_spec(package) is None:
            append(jsonl, record | {"status": "skipped", "error": f"{package} is not installed"})
            continue
        try:  # (sparsify_step imports sparsify only when a run starts: a broken install fails each run)
            modules[name] = importlib.import_module(f"benchmarks.{name}")
        except ImportError as err:
            append(jsonl, record | {"status": "failed", "error": f"does not import: {type(err).__name__}: {err}"})
    runs = []
    for text in args.shapes.split(","):
        d_in, d_sae = shape(text)
        common = ["--d-in", str(d_in), "--d-sae", str(d_sae), "--batch", str(args.batch), "--warmup",
                  str(args.warmup), "--steps", str(args.steps), "--device", args.device]
        if "saelens_step" in modules:
            for precision in SAELENS_PRECISIONS:
                for variant in SAELENS_VARIANTS:
                    labels = {"shape": f"{d_in}x{d_sae}", "variant": f"SAELens {variant}", "precision": precision}
                    runs.append((f"saelens {variant} {d_in}x{d_sae} {precision}", labels,
                                 ["saelens_step", "--variant", variant, "--precision", precision, *common]))
        if "sparsify_step" in modules:  # bf16 on a GPU: its forward's own autocast
            labels = {"shape": f"{d_in}x{d_sae}", "variant": "sparsify topk", "precision": "own"}
            runs.append((f"sparsify topk {d_in}x{d_sae}", labels, ["sparsify_step", *common]))
    return runs, lambda argv: modules[argv[0]].main(argv[1:])


# -- the training sweep --------------------------------------------------------------------------------------
def sweep_jobs(sweep: Path, variants: list[str], precisions: list[str]) -> list[dict[str, Any]]:
    """One entry per job of `-m sae=<variants> trainer.precision=<precisions>` (Hydra numbers the jobs in that
    product's order): its metrics.json, or the error its directory records."""
    jobs = []
    for number, (variant, precision) in enumerate((v, p) for v in variants for p in precisions):
        job_dir = sweep / str(number)
        entry: dict[str, Any] = {"variant": variant, "precision": precision}
        metrics = job_dir / "metrics.json"
        if metrics.exists():
            data = json.loads(metrics.read_text())
            overrides = data.get("overrides", [])
            if f"sae={variant}" in overrides and f"trainer.precision={precision}" in overrides:
                entry |= {"fvu": data.get("fvu"), "l0": data.get("l0"), "wall_time_s": data.get("wall_time_s")}
            else:
                entry["error"] = f"job {number} ran other overrides: {overrides}"
        else:
            entry["error"] = job_error(job_dir)
        jobs.append(entry)
    return jobs


def job_error(job_dir: Path) -> str:
    """The job's one-line error (train.log's "job failed (...)" line, or error.txt's last line)."""
    log = job_dir / "train.log"
    if log.exists():
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if "job failed" in line:  # "job failed (ConfigError: ...); details in .../error.txt"
                message = line.split("job failed", 1)[1].split("; details in", 1)[0].strip(" :")
                return message.removeprefix("(").removesuffix(")")[:300]
    error = job_dir / "error.txt"
    if error.exists():
        lines = [ln for ln in error.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "error.txt is empty"
    return "no metrics.json (the sweep did not reach this job)"


def quality_rows(jobs: list[dict[str, Any]], precisions: list[str]) -> list[dict[str, Any]]:
    """Per variant: FVU and L0 in each precision, relative to the first (32-true), flagged outside 2%."""
    base_precision = precisions[0]
    rows = []
    for variant in dict.fromkeys(j["variant"] for j in jobs):
        by_precision = {j["precision"]: j for j in jobs if j["variant"] == variant}
        base = by_precision.get(base_precision, {})
        row: dict[str, Any] = {"variant": variant, "cells": {}, "flags": []}
        for precision in precisions:
            job = by_precision.get(precision, {"error": "not run"})
            if "error" in job:
                row["cells"][precision] = {"error": job["error"]}
                row["flags"].append(f"{precision} failed")
                continue
            cell = {"fvu": job["fvu"], "l0": job["l0"]}
            if precision != base_precision and "error" not in base:
                for metric in ("fvu", "l0"):
                    change = (job[metric] - base[metric]) / base[metric] if base[metric] else float("inf")
                    cell[f"{metric}_change"] = change
                    if abs(change) > QUALITY_TOLERANCE:
                        row["flags"].append(f"{precision} {metric.upper()} {100 * change:+.1f}%")
            row["cells"][precision] = cell
        rows.append(row)
    return rows


# -- the report ----------------------------------------------------------------------------------------------
def cell_error(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:120]


def run_counts(records: list[dict[str, Any]]) -> str:
    """e.g. "30 runs: 28 ok, 2 failed" (each run's last record)."""
    runs = latest(records).values()
    statuses = {r["status"]: 0 for r in runs}
    for r in runs:
        statuses[r["status"]] += 1
    return f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in statuses.items())


def device_line(records: list[dict[str, Any]]) -> str:
    """Which device, torch and SAELAB_KERNELS the figures come from (the first run that finished)."""
    for record in records:
        if record.get("status") == "ok" and "gpu" in record["result"]:
            r = record["result"]
            return f"Device: {r['gpu']}; torch {r.get('torch', '?')}; SAELAB_KERNELS={r.get('saelab_kernels', '?')}"
    return "Device: no run finished"


def number(result: dict[str, Any], key: str, spec: str) -> str:
    """result[key] formatted, or n/a where the run did not report it."""
    value = result.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def step_table(records: list[dict[str, Any]]) -> list[str]:
    header = ["| shape | variant | precision | tok/s | TFLOP/s roofline | fraction | reference ratio | syncs/step "
              "| kernels |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    return header + table_rows(records, False, ("shape", "variant", "precision"), 5, step_cells)


def step_cells(r: dict[str, Any]) -> str:
    if "library" in r:  # SAELens's or sparsify's step: tokens/s only
        return f"{number(r, 'tokens_per_s', ',.0f')} | | | | | {r['library']} ({r['precision']}) |"
    ratio = f"{r['reference_ratio']:.2f}x" if r.get("reference_ratio") is not None else (
        f"n/a ({cell_error(r.get('reference_note') or 'not measured')})")
    return (f"{number(r, 'tokens_per_s', ',.0f')} | {number(r, 'roofline_tflops', '.3g')} | "
            f"{number(r, 'roofline_fraction', '.2f')} | {ratio} | {number(r, 'syncs_per_step', '.1f')} | "
            f"{r.get('kernels', 'unknown')} |")


def large_table(records: list[dict[str, Any]]) -> list[str]:
    """The --large runs: throughput, and the slice of one step against plain torch."""
    header = ["| shape | variant | batch | tok/s | slice errors (relative) | slice |", "|---|---|---:|---:|---|---|"]
    return header + table_rows(records, True, ("shape", "variant", "batch"), 2, lambda r: (
        f"{number(r, 'tokens_per_s', ',.0f')} | {r.get('slice_errors', '')} | "
        f"{'ok' if r.get('slice_ok') else 'WRONG'} |"))


def table_rows(records: list[dict[str, Any]], large: bool, head: Sequence[str], empty_cells: int,
               cells: Callable[[dict[str, Any]], str]) -> list[str]:
    """One row per run of the grid (large=False) or of --large: its labels, then cells(result), or its status
    and error with `empty_cells` empty cells where it did not finish."""
    rows = []
    for record in latest(records).values():
        if bool(record.get("large")) != large:
            continue
        labels = "| " + " | ".join(str(record.get(key, "")) for key in head) + " |"
        if record["status"] != "ok":
            status = "crashed or timed out" if record["status"] == "started" else record["status"]
            rows.append(f"{labels} {status}: {cell_error(record.get('error', ''))} |" + " |" * empty_cells)
        else:
            rows.append(f"{labels} {cells(record['result'])}")
    return rows


def quality_table(rows: list[dict[str, Any]], precisions: list[str]) -> list[str]:
    header = "| variant | " + " | ".join(f"FVU {p} | L0 {p}" for p in precisions) + " | flag |"
    lines = [header, "|---|" + "---:|---:|" * len(precisions) + "---|"]
    for row in rows:
        cells = []
        for precision in precisions:
            cell = row["cells"][precision]
            if "error" in cell:
                cells += [f"failed: {cell_error(cell['error'])}", ""]
                continue
            for metric in ("fvu", "l0"):
                text = f"{cell[metric]:.4g}"
                if f"{metric}_change" in cell:
                    text += f" ({100 * cell[f'{metric}_change']:+.1f}%)"
                cells.append(text)
        flag = "; ".join(row["flags"]) if row["flags"] else f"ok (within {100 * QUALITY_TOLERANCE:.0f}%)"
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {flag} |")
    return lines


def parts_table(parts: Path) -> list[str]:
    lines = ["| part | status | seconds | note |", "|---|---|---:|---|"]
    if parts.exists():
        for line in parts.read_text().splitlines():
            fields = (line.split("\t") + ["", "", "", ""])[:4]
            lines.append("| " + " | ".join(cell_error(f) for f in fields) + " |")
    return lines


def report(args: argparse.Namespace) -> str:
    precisions = args.train_precisions.split(",")
    steps = read_lines(args.steps_jsonl)
    records = steps + (read_lines(args.libraries_jsonl) if args.libraries_jsonl else [])
    sweep = args.sweep
    jobs = sweep_jobs(sweep, args.variants.split(","), precisions) if sweep and sweep.exists() else []
    rows = quality_rows(jobs, precisions)
    if args.quality_json:
        args.quality_json.write_text(json.dumps({"jobs": jobs, "rows": rows}, indent=2) + "\n")
    text = ["## GPU check", "", device_line(steps), "", *(parts_table(args.parts) if args.parts else []), "",
            f"### Training step (benchmarks/train_step.py; {run_counts(records)}; reference ratio = saelab's tok/s "
            "over the hand-written step's)", "",
            *step_table(records), "",
            "### Large shapes (tf32, lean: saelab's step alone; a slice of one step against plain torch)", "",
            *(large_table(steps) if any(r.get("large") for r in steps) else ["(no large-shape run)"]), "",
            f"### Quality (saelab.cli.train, held-out FVU and L0; change relative to {precisions[0]})", "",
            *(quality_table(rows, precisions) if rows else ["(no training sweep ran)"]), ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("steps", "libraries"):
        p = sub.add_parser(name)
        p.add_argument("--jsonl", type=Path, required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--shapes", default="768x24576,2304x65536")
        p.add_argument("--variants", default=",".join(VARIANTS))
        p.add_argument("--precisions", default=",".join(STEP_PRECISIONS))
        p.add_argument("--batch", type=int, default=4096)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--sync-steps", type=int, default=3)
        p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
        p.add_argument("--large", help=f"lean runs variant:d_inxd_sae:batch,... (e.g. {LARGE}) instead of the grid")
    p = sub.add_parser("report")
    p.add_argument("--steps-jsonl", type=Path, required=True)
    p.add_argument("--libraries-jsonl", type=Path)
    p.add_argument("--sweep", type=Path, help="the training multirun's directory (jobs 0, 1, ...)")
    p.add_argument("--parts", type=Path, help="part<TAB>status<TAB>seconds<TAB>note lines")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--train-precisions", default=",".join(TRAIN_PRECISIONS))
    p.add_argument("--out", type=Path)
    p.add_argument("--quality-json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "report":
        text = report(args)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    if args.command == "steps":
        from benchmarks import train_step

        runs = large_runs(args) if args.large else step_runs(args)
        return 1 if run_grid(args.jsonl, runs, train_step.main, args.budget_s) else 0
    runs, call = library_runs(args, args.jsonl)  # sae_lens, sparsify: on the path from .gpu/saelens (gpu_check.sh)
    return 1 if run_grid(args.jsonl, runs, call, args.budget_s) else 0


if __name__ == "__main__":
    raise SystemExit(main())
