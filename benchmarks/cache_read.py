"""Activation-cache read throughput vs generation, on MiniLM (blocks.3.hook_out) and pydocs windows.

Builds a fresh cache of --windows train windows with the real model (timing the forward passes and the
whole build), then streams it the way training does -- shuffled shards, permuted groups of buffer_tokens
activations, batches of batch_size, divided by the scale -- and prints activations/s and the read /
generation ratio. For comparison it also times the same reads pushed through the ShuffleBuffer (the
uncached stream's mixer, not used on cached reads). Reads come
from the page cache (the OS keeps a just-written cache there; a cold first read adds one sequential disk
read of the shards, ~1.5 KB per activation).

    .venv/bin/python -m benchmarks.cache_read [--windows 1024] [--batches 2000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.generation import HOOK, load_minilm, windows_for
from saelab.data.activations import activation_chunks
from saelab.data.buffer import ShuffleBuffer
from saelab.data.cache import ActivationCache, open_caches
from saelab.data.cache_manifest import Request
from saelab.data.tokens import SpecialTokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1024, help="train windows to cache (128 tokens each)")
    parser.add_argument("--batches", type=int, default=2000, help="training batches to read")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--buffer-tokens", type=int, default=65_536)
    args = parser.parse_args()

    model = load_minilm()
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    windows = windows_for(model.tokenizer, args.windows + 32, 128)
    split = {"train": windows[: args.windows], "eval": windows[args.windows :]}
    forward_s = 0.0

    def timed_activations(w: torch.Tensor, hooks: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal forward_s
        chunks = ({HOOK: chunk} for chunk in activation_chunks(model, w, special, 32))
        while True:
            start = time.perf_counter()
            chunk = next(chunks, None)
            forward_s += time.perf_counter() - start
            if chunk is None:
                return
            yield chunk

    root = Path(tempfile.mkdtemp(prefix="saelab-cache-bench-"))
    try:
        cache = ActivationCache(root, {"model": model.name, "hook": HOOK, "benchmark": args.windows,
                                       "special_tokens": {"excluded": sorted(special.excluded)}}, model.d_model)
        start = time.perf_counter()
        request = Request(10**12, 1, "unit_mean_squared_norm", 32_768)  # the whole pass
        reader = open_caches({HOOK: cache}, request, lambda: split, timed_activations)[HOOK]
        build_s = time.perf_counter() - start
        n = reader.train_tokens + len(reader.eval_activations(10**9))
        generation = n / forward_s
        print(f"cache: {reader.train_tokens:,} train activations (d={model.d_model}, float32) in "
              f"{len(reader.train)} shards, {sum(s.entry['bytes'] for s in reader.train) / 2**20:.0f} MB")
        print(f"generation (forward passes only): {generation:,.0f} activations/s; whole build incl. "
              f"writes + sha256: {n / build_s:,.0f} activations/s")

        def rate(batches: Iterator[torch.Tensor]) -> float:
            next(batches)  # the first group's read is part of the run, not of the steady state
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(batches)
            return args.batches * len(batch) / (time.perf_counter() - start)

        generator = torch.Generator().manual_seed(0)
        cached = rate(reader.batches(generator, args.batch_size, args.buffer_tokens, reader.scale))
        print(f"read as training batches (groups of {args.buffer_tokens:,}, /C): {cached:,.0f} activations/s "
              f"= {cached / generation:,.0f}x generation ({args.batches} batches of {args.batch_size})")
        groups = (g for _ in iter(int, 1) for g in reader.epoch(torch.Generator().manual_seed(0)))
        buffered = rate(batch / reader.scale for batch in ShuffleBuffer(
            groups, args.buffer_tokens, args.batch_size, torch.Generator().manual_seed(1)))
        print(f"same shards through the ShuffleBuffer instead:        {buffered:,.0f} activations/s "
              f"= {buffered / generation:,.0f}x generation")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
