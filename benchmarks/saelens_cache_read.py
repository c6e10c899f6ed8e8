"""SAELens's own ActivationsStore reading a cache in its layout: activations/s and GB/s, printed as one JSON line
(the SAELens side of saelab-vs-SAELens cache-read comparisons; another benchmark calls it).

SAELens pins transformer-lens < 4, so it never goes into saelab's environment: run this file with its venv's Python
(scripts/saelens_compat/venv.sh makes one at $SAELENS_VENV), from the repository root:

    $SAELENS_VENV/bin/python benchmarks/saelens_cache_read.py CACHE [--seconds 3] [--warmup 1] [--mode loader|raw]
        [--batch-size 4096] [--store-batch 32] [--buffer-batches N] [--exclude 0,1]

CACHE is a directory as CacheActivationsRunner (or `saelab-cache export --format saelens`) writes it. The store is
built as a SAELens training run with `use_cached_activations=True` builds it, on the CPU in float32. --mode loader
(default) times what training consumes: `next(store)`, batches of --batch-size activations out of SAELens's mixing
buffer (--buffer-batches store batches of --store-batch windows, special positions dropped first); --mode raw times
`get_filtered_llm_batch` alone (reading and filtering store batches, no mixing). The cache is cycled over as often as
the time asks. After --warmup seconds, --seconds of reading are timed; `gb_per_s` counts the float32 bytes served
(activations x d_in x 4), `stored_gb_per_s` the bytes of every position read at the cache's dtype (raw mode only).
Exclusions: --exclude, else those in saelab_export.json beside the cache, else none.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import datasets
import sae_lens
import torch
from sae_lens.training.activations_store import ActivationsStore

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def build_store(cache: Path, args: argparse.Namespace) -> tuple[ActivationsStore, dict]:
    info = json.loads((cache / "dataset_info.json").read_text())
    features = datasets.Features.from_dict(info["features"])
    hook, column = next((name, f) for name, f in features.items() if isinstance(f, datasets.Array2D))
    context_size, d_in = column.shape
    buffer_batches = args.buffer_batches or max(20, -(-2 * args.batch_size // context_size))
    sidecar = cache / "saelab_export.json"
    if args.exclude is not None:
        exclude = [int(i) for i in args.exclude.split(",") if i.strip()]
    else:
        exclude = json.loads(sidecar.read_text())["saelens"]["exclude_special_tokens"] if sidecar.exists() else []
    store = ActivationsStore(model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
                             context_size=context_size, d_in=d_in, n_batches_in_buffer=buffer_batches,
                             total_training_tokens=10**12, store_batch_size_prompts=args.store_batch,
                             train_batch_size_tokens=args.batch_size, prepend_bos=False,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(cache),
                             exclude_special_tokens=torch.tensor(exclude, dtype=torch.long) if exclude else None)
    return store, {"hook": hook, "context_size": context_size, "d_in": d_in, "dtype": column.dtype,
                   "exclude_special_tokens": exclude, "buffer_batches": buffer_batches}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--mode", choices=("loader", "raw"), default="loader")
    parser.add_argument("--batch-size", type=int, default=4096, help="train_batch_size_tokens (loader mode)")
    parser.add_argument("--store-batch", type=int, default=32, help="store_batch_size_prompts: windows per read")
    parser.add_argument("--buffer-batches", type=int, help="n_batches_in_buffer (loader mode; SAELens's mixing buffer "
                        "holds it x context_size activations; default: SAELens's 20, or enough for 2 batches)")
    parser.add_argument("--exclude", help="comma-separated token ids (SAELens's exclude_special_tokens)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # one "new epoch" warning per pass over a small cache
    store, meta = build_store(args.cache, args)
    if args.mode == "loader":
        def read() -> tuple[int, int]:
            return len(next(store)), 0
    else:
        def read() -> tuple[int, int]:
            return len(store.get_filtered_llm_batch()), args.store_batch * meta["context_size"]
    deadline = time.perf_counter() + args.warmup
    while time.perf_counter() < deadline:
        read()
    activations = positions = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < args.seconds:
        served, read_positions = read()
        activations, positions = activations + served, positions + read_positions
    d_in = meta["d_in"]
    result = {
        "reader": "saelens", "sae_lens": sae_lens.__version__, "mode": args.mode, "cache": str(args.cache), **meta,
        "batch_size": args.batch_size if args.mode == "loader" else None, "store_batch": args.store_batch,
        "seconds": elapsed, "activations": activations, "activations_per_s": activations / elapsed,
        "gb_per_s": activations * d_in * 4 / elapsed / 1e9,
        "stored_gb_per_s": positions * d_in * BYTES.get(meta["dtype"], 4) / elapsed / 1e9 if positions else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
