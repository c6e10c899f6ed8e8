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

from saelab.data.model import LoadedModel, check_sae_hooks, hook_widths, load_model
from saelab.data.protocol import StreamDataModule
from saelab.data.sources import DataSource, build_source
from saelab.errors import ConfigError


@dataclass
class Stream:
    source: DataSource | None  # None: a datamodule given as it is (tests), with no truth to measure against
    model: LoadedModel | None  # None: the source makes activations itself
    datamodule: StreamDataModule  # set up: scales and held-out activations ready

    @property
    def truth(self) -> Any | None:
        """The world that made the activations (ground-truth metrics), where the source knows it."""
        return self.source.ground_truth(self.datamodule) if self.source is not None else None


def load_stream_model(model_cfg: Mapping[str, Any], source: DataSource, hooks: Sequence[str]) -> LoadedModel | None:
    """The model the source reads through, with every hook a job of the group reads (None: no model needed).
    Hooks are checked per job afterwards (check_job_fits), so one job's bad hook fails that job alone."""
    if not source.needs_model:
        return None
    return load_model(model_cfg, hooks=list(dict.fromkeys(hooks)), check_hooks=False)


def stream_widths(model: LoadedModel | None, hooks: Sequence[str]) -> dict[str, int]:
    """{hook: width} of the model's hooks among `hooks` (one short forward pass; empty without a model)."""
    if model is None:
        return {}
    return hook_widths(model, [h for h in dict.fromkeys(hooks) if h in model.bridge.hook_dict])


def check_job_fits(source: DataSource, model: LoadedModel | None, widths: Mapping[str, int], hook: str,
                   target_hook: str | None, d_in: int, d_out: int | None = None) -> None:
    """ConfigError unless an SAE of width d_in (and a transcoder's d_out) can read this stream at `hook`."""
    if model is None:
        if source.d_in is not None and source.d_in != d_in:
            raise ConfigError("sae.d_in", d_in, f"{source.d_in_field} ({source.d_in})")
        return
    check_sae_hooks(model, widths, hook, target_hook, d_in)
    if target_hook is not None and d_out is not None and d_out != model.d_model:
        raise ConfigError("sae.d_out", d_out, f"null or the model's d_model ({model.d_model})")


def open_stream(cfg: DictConfig, model: LoadedModel | None, hooks: Sequence[str], train_tokens: int | None,
                source: DataSource | None = None, data_cfg: Mapping[str, Any] | None = None) -> Stream:
    """The source's datamodule for `hooks`, set up (normalisation scales, held-out activations). `train_tokens`:
    the activations training will read (None: data.train_tokens); `data_cfg`: the data section to use (default:
    the config's)."""
    data_cfg = data_cfg if data_cfg is not None else cfg.data
    source = source if source is not None else build_source(data_cfg)
    datamodule = source.datamodule(data_cfg, model, int(cfg.eval.tokens), int(cfg.seed),
                                   cache_dir=str(cfg.paths.cache_dir), train_tokens=train_tokens,
                                   hooks=list(dict.fromkeys(hooks)))
    datamodule.setup()
    return Stream(source, model, datamodule)


def open_stream_of(overrides: Sequence[str]) -> tuple[DictConfig, Stream, str]:
    """(config, stream, its first hook) for a run's overrides, as saelab-train would open them: for analysis
    scripts that read a finished run's activations again (scripts/)."""
    from hydra.core.utils import setup_globals

    from saelab.run.compose import compose_run_config

    setup_globals()  # the ${now:...} resolver the composed config names
    cfg = compose_run_config(overrides)
    source = build_source(cfg.data)
    hooks = source.hooks(cfg.model)
    model = load_stream_model(cfg.model, source, hooks)
    return cfg, open_stream(cfg, model, hooks, train_tokens=int(cfg.data.train_tokens), source=source), hooks[0]


def check_transcoder_config(cfg: DictConfig, source: DataSource) -> None:
    """model.target_hook makes a transcoder: it needs a model (a source read through one) and a hook other than its
    input; sae.d_out is then filled in from the model (saelab.run.training), and is null for an SAE."""
    target = cfg.model.get("target_hook")
    if target is None:
        if cfg.sae.get("d_out") is not None:
            raise ConfigError("sae.d_out", cfg.sae.d_out, "null for an SAE (a transcoder's output width comes with "
                              "model.target_hook)")
        return
    if not source.needs_model:
        raise ConfigError("model.target_hook", target, f"null with data={source.name} (no model to read a target "
                          "from)")
    if str(target) == str(cfg.model.hook) or cfg.model.get("hooks"):
        raise ConfigError("model.target_hook", target, "a hook other than model.hook (and model.hooks null)")
