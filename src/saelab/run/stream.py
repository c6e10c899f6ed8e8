"""A group's activation stream, opened one way for every tool: the data source, the model it reads through (loaded
once, with every job's hook; none for a source that makes its own activations), and the source's datamodule.

saelab-train (run/training.py), saelab-eval, saelab-cache and saelab-dashboard open their stream (or its model) here;
the periodic evaluation reads the stream training opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from saelab.data.model import LoadedModel, check_layer_order, check_sae_hooks, hook_widths, load_model
from saelab.data.protocol import StreamDataModule
from saelab.data.sources import DataSource, build_source
from saelab.errors import ConfigError
from saelab.sites import Sites


@dataclass
class Stream:
    source: DataSource | None  # None: a datamodule given as it is (tests), with no truth to measure against
    model: LoadedModel | None  # None: the source makes activations itself
    datamodule: StreamDataModule  # set up: scales and held-out activations ready

    @property
    def truth(self) -> Any | None:
        """The world that made the activations (ground-truth metrics), where the source knows it."""
        return self.source.ground_truth(self.datamodule) if self.source is not None else None


@dataclass(frozen=True)
class Reader:
    """What one SAE reads from a stream: its input hook, a transcoder's target hook, and the widths it expects
    (None: not checked, e.g. before the SAE is built); a crosscoder's `sites` (each site d_in wide)."""

    hook: str
    target_hook: str | None = None
    d_in: int | None = None
    d_out: int | None = None
    sites: Sites | None = None

    @property
    def hooks(self) -> list[str]:
        if self.sites is not None:
            return self.sites.hooks
        return [self.hook] + ([self.target_hook] if self.target_hook is not None else [])


def open_stream(cfg: Mapping[str, Any], readers: Sequence[Reader], train_tokens: int | None = None, *,
                source: DataSource | None = None, data_cfg: Mapping[str, Any] | None = None,
                held_out_only: bool = False) -> tuple[Stream | None, dict[int, ConfigError]]:
    """The one way any tool opens activations: source -> model (loaded once, with every reader's hook) -> widths
    -> each reader's fit -> the datamodule, set up (normalisation scales, held-out activations).

    Returns the stream (None when no reader fits) and {reader index: its error}, so one job's bad hook or width
    fails that job alone. `cfg` holds model, data, eval.tokens, seed and paths.cache_dir; `train_tokens`: the
    activations training will read (None: data.train_tokens); `data_cfg`: the data section to use (default: the
    config's); `held_out_only`: the datamodule is not set up (no scales, no cache), for tools that read the
    held-out windows themselves (the dashboard).
    """
    data_cfg = data_cfg if data_cfg is not None else cfg["data"]
    source = source if source is not None else build_source(data_cfg)
    hooks = list(dict.fromkeys(h for r in readers for h in r.hooks))
    model = _load_model(cfg["model"], source, hooks)
    widths = _widths(model, hooks)
    errors: dict[int, ConfigError] = {}
    for i, reader in enumerate(readers):
        try:
            _check_fits(source, model, widths, reader)
        except ConfigError as err:
            errors[i] = err
    hooks = list(dict.fromkeys(h for i, r in enumerate(readers) if i not in errors for h in r.hooks))
    if not hooks:
        return None, errors
    if model is not None:
        model.hooks = hooks  # the stream serves the readers that fit, and no other hook
    paths = cfg.get("paths") or {}
    datamodule = source.datamodule(data_cfg, model, int(cfg["eval"]["tokens"]), int(cfg["seed"]),
                                   cache_dir=str(paths.get("cache_dir")) if paths.get("cache_dir") else None,
                                   train_tokens=train_tokens, hooks=hooks)
    if not held_out_only:
        datamodule.setup()
    return Stream(source, model, datamodule), errors


def open_one_stream(cfg: Mapping[str, Any], reader: Reader, train_tokens: int | None = None, **kwargs: Any) -> Stream:
    """`open_stream` for a tool with one reader: its error raised."""
    stream, errors = open_stream(cfg, [reader], train_tokens, **kwargs)
    if errors:
        raise errors[0]
    assert stream is not None
    return stream


def _load_model(model_cfg: Mapping[str, Any], source: DataSource, hooks: Sequence[str]) -> LoadedModel | None:
    """The model the source reads through, with every hook a reader reads (None: no model needed). Hooks are
    checked per reader afterwards (_check_fits), so one reader's bad hook fails it alone."""
    if not source.needs_model:
        return None
    return load_model(model_cfg, hooks=list(hooks), check_hooks=False)


def _widths(model: LoadedModel | None, hooks: Sequence[str]) -> dict[str, int]:
    """{hook: width} of the model's hooks among `hooks` (one short forward pass; empty without a model)."""
    if model is None:
        return {}
    names = model.site_names()
    return hook_widths(model, [h for h in hooks if h in names])


def _check_fits(source: DataSource, model: LoadedModel | None, widths: Mapping[str, int], reader: Reader) -> None:
    """ConfigError unless the reader's SAE (width d_in, a transcoder's d_out) can read this stream."""
    if model is None:
        if reader.d_in is not None and source.d_in is not None and source.d_in != reader.d_in:
            raise ConfigError("sae.d_in", reader.d_in, f"{source.d_in_field} ({source.d_in})")
        return
    sites = reader.sites if reader.sites is not None else Sites.of(reader.hook, reader.target_hook)
    targets = sites.writes if sites.cross_layer else (reader.target_hook,) * len(sites.reads)
    for hook, target in zip(sites.reads, targets, strict=True):
        check_sae_hooks(model, widths, hook, target, reader.d_in)
    if sites.cross_layer:
        check_layer_order(widths, sites.reads, sites.writes)
    if reader.target_hook is not None and reader.d_out is not None and reader.d_out != model.d_model:
        raise ConfigError("sae.d_out", reader.d_out, f"null or the model's d_model ({model.d_model})")


def open_stream_of(overrides: Sequence[str]) -> tuple[DictConfig, Stream, str]:
    """(config, stream, its first hook) for a run's overrides, as saelab-train would open them: for analysis
    scripts that read a finished run's activations again (scripts/)."""
    from hydra.core.utils import setup_globals

    from saelab.run.compose import compose_run_config

    setup_globals()  # the ${now:...} resolver the composed config names
    cfg = compose_run_config(overrides)
    source = build_source(cfg.data)
    sites = source.sites(cfg.model)
    reader = Reader(sites.hook, sites.target_hook, sites=sites)
    return cfg, open_one_stream(cfg, reader, int(cfg.data.train_tokens), source=source), sites.hook
