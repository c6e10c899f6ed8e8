"""Token windows -> hook activations, excluding special-token positions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from saelab.data.hf_reader import block_output_reader
from saelab.data.model import LoadedModel, stop_layer
from saelab.data.tokens import SpecialTokens, keep_mask


@torch.inference_mode()
def window_activations(model: LoadedModel, windows: Tensor, sites: list[str] | None = None, fast: bool = True
                       ) -> dict[str, Tensor]:
    """Activations [batch, ctx, d] at every site (default: the model's hooks), each model of a diffing pair
    (model.diff_with) run once on the same windows, computing no block past its deepest hook.

    Block outputs (`blocks.N.hook_out` / `hook_resid_post`) come from a plain HF forward sharing the bridge's
    weights (saelab.data.hf_reader: the bridge's values up to float32 rounding, without TransformerLens's
    overhead); any other hook, or a model the plain forward does not fit, goes through run_with_cache, as every
    hook does with fast=False (a caller reading other sites than the stream's, so the stream keeps its reader).
    """
    sites = list(sites if sites is not None else model.hooks)
    located = [model.side(site) for site in sites]
    acts: dict[str, Tensor] = {}
    for side in dict.fromkeys(m for m, _ in located):
        hooks = [hook for m, hook in located if m is side]
        own = _model_activations(side, windows.to(side.device), hooks, fast)
        acts |= {side.prefix + hook: a for hook, a in own.items()}
    return {site: acts[site] for site in sites}


def _model_activations(model: LoadedModel, windows: Tensor, hooks: list[str], fast: bool) -> dict[str, Tensor]:
    """One model's activations at its own hooks (named as in the model)."""
    reader = block_output_reader(model.bridge, hooks) if fast else None
    if reader is not None:
        return reader(windows)
    _, cache = model.bridge.run_with_cache(windows, names_filter=hooks, stop_at_layer=stop_layer(hooks))
    return {hook: cache[hook] for hook in hooks}


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
            acts = window_activations(model, batch, names)
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
