"""Up-front validation of a run's config: cheap checks that fail before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from saelab.data.cache import cache_root
from saelab.data.model import check_model_config
from saelab.data.normalize import METHODS
from saelab.errors import ConfigError, check_choice, check_positive

SOURCES = ("pydocs", "text_files", "hf")


def _int(field: str, value) -> int:
    """Accept 2e6 from the CLI for an integer field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_positive(field, value, integer=True)
    return value


def check_run_config(cfg: DictConfig) -> None:
    check_model_config(cfg.model)
    data = cfg.data
    check_choice("data.source", data.source, SOURCES)
    if data.source == "text_files" and (data.get("path") is None or not Path(str(data.path)).expanduser().exists()):
        raise ConfigError("data.path", data.get("path"), "an existing text file or directory")
    if data.source == "hf" and not data.get("path"):
        raise ConfigError("data.path", data.get("path"), "a Hugging Face dataset name or local directory")
    for name in ("context_size", "batch_size", "buffer_tokens", "train_tokens", "normalize_tokens",
                 "model_batch_size"):
        _int(f"data.{name}", data[name])
    if _int("data.buffer_tokens", data.buffer_tokens) < 2 * _int("data.batch_size", data.batch_size):
        raise ConfigError("data.buffer_tokens", data.buffer_tokens, "at least 2 x data.batch_size")
    if not 0 < float(data.eval_fraction) < 1:
        raise ConfigError("data.eval_fraction", data.eval_fraction, "a fraction strictly between 0 and 1")
    check_choice("data.normalize", data.normalize, METHODS)
    cache_root(data.get("cache"), cfg.paths.cache_dir)
    check_positive("optim.lr", cfg.optim.lr)
    if cfg.optim.betas is not None and (len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas)):
        raise ConfigError("optim.betas", list(cfg.optim.betas), "null or two numbers in [0, 1)")
    check_choice("optim.lr_warmup", cfg.optim.lr_warmup, ("linear", "cosine"))
    check_positive("optim.lr_warmup_steps", cfg.optim.lr_warmup_steps, allow_zero=True, integer=True)
    if not 0 <= float(cfg.optim.lr_decay_fraction) < 1:
        raise ConfigError("optim.lr_decay_fraction", cfg.optim.lr_decay_fraction, "a fraction in [0, 1)")
    _int("eval.tokens", cfg.eval.tokens)
    _int("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.every_n_steps is not None:
        _int("eval.every_n_steps", cfg.eval.every_n_steps)
    if cfg.trainer.get("max_steps") is not None:
        _int("trainer.max_steps", cfg.trainer.max_steps)
    _int("dead_window_tokens", cfg.dead_window_tokens)
