"""Token windows -> hook activations, excluding special-token positions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from saelab.data.hf_reader import block_output_reader
from saelab.data.model import LoadedModel
from saelab.data.tokens import SpecialTokens, keep_mask


@torch.inference_mode()
def window_activations(model: LoadedModel, windows: Tensor) -> dict[str, Tensor]:
    """Activations [batch, ctx, d] at every configured hook, computing no block past the deepest hook.

    Block outputs (`blocks.N.hook_out` / `hook_resid_post`) come from a plain HF forward sharing the bridge's
    weights (saelab.data.hf_reader: the bridge's values up to float32 rounding, without TransformerLens's
    overhead); any other hook, or a model the plain forward does not fit, goes through run_with_cache.
    """
    windows = windows.to(model.device)
    reader = block_output_reader(model.bridge, model.hooks)
    if reader is not None:
        return reader(windows)
    _, cache = model.bridge.run_with_cache(windows, names_filter=model.hooks, stop_at_layer=model.stop_at_layer)
    return {hook: cache[hook] for hook in model.hooks}


def activation_chunks(
    model: LoadedModel,
    windows: Tensor,
    special: SpecialTokens,
    batch_windows: int,
    hook: str | None = None,
    generator: torch.Generator | None = None,
    epochs: int | None = 1,
    hooks: list[str] | None = None,
) -> Iterator[Tensor]:
    """Yield float32 CPU activations [n_tokens, d] of the real-text positions, one model batch at a time.

    With `hooks` (several hook points of one forward pass), each chunk holds their activations side by side,
    [n_tokens, sum of widths] in the order given, so a shuffle treats a token's activations as one row and
    every hook sees the same tokens in the same order. With a generator the window order is reshuffled every
    epoch; `epochs=None` cycles forever.
    """
    names = hooks or [hook or model.hooks[0]]
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(windows), generator=generator) if generator is not None else None
        for start in range(0, len(windows), batch_windows):
            idx = order[start : start + batch_windows] if order is not None else slice(start, start + batch_windows)
            batch = windows[idx]
            acts = window_activations(model, batch)
            mask = keep_mask(batch, special).to(acts[names[0]].device)
            rows = [acts[name][mask] for name in names]
            yield (rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).float().cpu()
        epoch += 1


def collect(chunks: Iterator[Tensor], n_tokens: int) -> Tensor:
    """The first n_tokens activations of a chunk stream (fewer if the stream ends first)."""
    taken, have = [], 0
    for chunk in chunks:
        taken.append(chunk[: n_tokens - have])
        have += len(taken[-1])
        if have >= n_tokens:
            break
    return torch.cat(taken) if taken else torch.empty(0)
