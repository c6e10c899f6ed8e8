"""Fast path for block-output hooks: a plain Hugging Face forward instead of TransformerLens's wrappers.

The bridge wraps every HF module in a TransformerLens component and switches attention to eager; for the
output of a whole block (`blocks.N.hook_out`, or any alias of it such as `blocks.N.hook_resid_post`) that
costs 10-40% over a bare HF forward on CPU (benchmarks/generation.py). `BlockOutputReader` runs a plain copy
("twin") of the bridge's HF model that shares the bridge's tensors (no copy, no extra memory) and reads the
block outputs with torch forward hooks; the hook on the deepest block raises, so no later block (nor a head)
runs. The bridge's `blocks.N.hook_out` is the output of the HF block it wraps, so both agree (up to float
rounding: the twin uses sdpa attention, the bridge eager).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saelab.data.model import hook_layer

log = logging.getLogger(__name__)

# HF's default attention. The bridge's eager attention gives bit-identical values but is ~15% slower on
# CPU; sdpa agrees with it to float32 rounding (~1e-6 relative).
_ATTN = "sdpa"
_WRAPPED = "._original_component"  # where the bridge keeps each HF module it wraps
_readers: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], BlockOutputReader | None]] = (
    weakref.WeakKeyDictionary()
)


class _Stop(Exception):
    """Raised by the deepest hooked block once its output is captured: nothing after it has to run."""


def block_index(bridge: Any, hook: str) -> int | None:
    """N if `hook` names the bridge's `blocks.N.hook_out` hook point (under any alias), else None."""
    n = hook_layer(hook)
    blocks = getattr(bridge, "blocks", ())
    if n is None or n >= len(blocks):
        return None
    return n if bridge.hook_dict.get(hook) is getattr(blocks[n], "hook_out", None) else None


class BlockOutputReader:
    """Activations [batch, ctx, d] at block-output hooks, from a plain HF forward that stops after the last."""

    def __init__(self, bridge: Any, hooks: Sequence[str]):
        """Raises (ValueError, KeyError, AttributeError, ...) if the twin cannot be built for this bridge."""
        self.hooks = tuple(hooks)
        by_block: dict[int, list[str]] = {}
        for hook in self.hooks:
            n = block_index(bridge, hook)
            if n is None:
                raise ValueError(f"{hook} is not a block output")
            by_block.setdefault(n, []).append(hook)
        self.model = _twin(bridge.original_model)
        paths = {id(module): name for name, module in bridge.original_model.named_modules()}
        last = max(by_block)
        for n, names in by_block.items():
            block = self.model.get_submodule(paths[id(bridge.blocks[n])])
            block.register_forward_hook(functools.partial(self._capture, names, n == last))
        self._captured: dict[str, Tensor] = {}

    def _capture(self, names: list[str], stop: bool, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._captured.update(dict.fromkeys(names, hidden))
        if stop:
            raise _Stop

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor) -> dict[str, Tensor]:
        self._captured = {}
        with contextlib.suppress(_Stop):
            self.model(input_ids=input_ids)
        captured, self._captured = self._captured, {}
        if set(captured) != set(self.hooks):
            raise RuntimeError(f"the forward pass did not reach hooks {sorted(set(self.hooks) - set(captured))}")
        return captured


def _twin(wrapped: nn.Module) -> nn.Module:
    """A plain HF model of the same class and config as the bridge's, on the bridge's own tensors."""
    config = copy.deepcopy(wrapped.config)  # _from_config edits the config it is given: keep the bridge's
    with torch.device("meta"):  # no memory: every tensor is the bridge's, assigned below
        twin = type(wrapped)._from_config(config, attn_implementation=_ATTN, dtype=wrapped.dtype)
    twin.load_state_dict({k.replace(_WRAPPED, ""): v for k, v in wrapped.state_dict().items()},
                         assign=True, strict=False)
    buffers = {k.replace(_WRAPPED, ""): v for k, v in wrapped.named_buffers()}
    for name, buffer in list(twin.named_buffers()):  # non-persistent buffers are not in the state dict
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    left = [name for name, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"no tensor of the bridge for {', '.join(left[:5])}")
    config.use_cache = False  # no KV cache to build
    return twin.eval().requires_grad_(False)


def block_output_reader(bridge: Any, hooks: Sequence[str]) -> BlockOutputReader | None:
    """The fast path for `hooks` on this bridge (built once, then reused), or None to use run_with_cache.

    None when a hook is not a block output, or when the twin cannot be built for this architecture.
    """
    hooks = tuple(hooks)
    cached = _readers.get(bridge)
    if cached is None or cached[0] != hooks:
        reader = None
        if hooks and all(block_index(bridge, hook) is not None for hook in hooks):
            try:
                with torch.inference_mode(False):  # the twin's parameters must be ordinary tensors
                    reader = BlockOutputReader(bridge, hooks)
            except Exception as err:  # any architecture the twin does not fit: the bridge still works
                log.warning("activations: plain HF fast path unavailable (%s: %s); using the bridge's "
                            "run_with_cache", type(err).__name__, err)
        cached = _readers[bridge] = (hooks, reader)
    return cached[1]
