"""The run config's schema: one dataclass per section, holding its fields, their types and their checks once.

The YAML files under saelab/conf choose options, hold each field's default and document it; these classes say
what each field is and what it may hold. `check_run_config` reads every section of a job through
`saelab.sections.read_section` in one pass (run/job.py's prepare_job, so a sweep refuses a bad job alone, before
any group trains), each failure one line naming the field. Sections of their own live with what they configure:
the variant's (`sae`: its Config class, saes/), a source's own fields (data/sources/), `l0_control`
(run/l0_control.py); they are read the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig

from saelab.data.cache_key import cache_store
from saelab.data.cache_manifest import STORED_DTYPES
from saelab.data.model import DTYPES, check_diff_sites, is_diff_site
from saelab.data.normalize import METHODS
from saelab.data.sources import DataSource, build_source
from saelab.errors import ConfigError, check_choice, check_count, check_positive
from saelab.run.l0_control import L0ControlConfig
from saelab.run.member import NAN_POLICIES
from saelab.run.trainer_checks import check_devices, check_precision
from saelab.sections import read_section
from saelab.sites import Sites


@dataclass(frozen=True)
class RunSection:
    """The top level: what a job is, beside its groups."""

    seed: Annotated[int, "an integer"]
    dead_window_tokens: int
    ckpt_path: str | None
    init_from: str | None
    nan_policy: str
    compile: bool
    optimized_metric: str | None
    l0_target: Any
    l0_penalty: float

    def validate(self) -> None:
        check_count("dead_window_tokens", self.dead_window_tokens)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        if self.ckpt_path not in (None, "last") and not Path(str(self.ckpt_path)).expanduser().is_file():
            raise ConfigError("ckpt_path", self.ckpt_path, 'null, "last", or an existing checkpoint file')
        if self.init_from is not None and not (Path(str(self.init_from)).expanduser() / "cfg.json").is_file():
            raise ConfigError("init_from", self.init_from, "null or a SAELens-format SAE directory (cfg.json + "
                              "sae_weights.safetensors)")


@dataclass(frozen=True)
class ModelSection:
    """The model the activations are read through (a source without a model ignores it)."""

    name: str | None
    path: str | None
    hook: Any  # one hook, or a list of hooks (a crosscoder)
    target_hook: Any  # null, one hook (a transcoder), or a list as long as hook's (a cross-layer transcoder)
    d_model: int
    dtype: str
    device: str
    diff_with: str | None  # a diffing pair's second model (its hooks are the sites diff/<hook>)

    def validate(self) -> None:
        hooks = [self.hook] if isinstance(self.hook, str) else self.hook
        if not isinstance(hooks, Sequence) or not hooks or not all(isinstance(h, str) for h in hooks):
            raise ConfigError("model.hook", self.hook, "a hook name, or a list of hook names (a crosscoder)")
        targets = [self.target_hook] if isinstance(self.target_hook, str) else self.target_hook
        if targets is not None and (not isinstance(targets, Sequence) or not targets
                                    or not all(isinstance(h, str) for h in targets)):
            raise ConfigError("model.target_hook", self.target_hook, "null, a hook name (a transcoder), or a list of "
                              "hook names as long as model.hook's (a cross-layer transcoder)")
        sites = Sites.of(hooks, targets)
        sites.check()
        check_diff_sites(list(sites.hooks), self.diff_with)
        if sites.cross_layer and any(is_diff_site(h) for h in sites.hooks):
            raise ConfigError("model.target_hook", list(targets), "hooks of one model (a cross-layer transcoder "
                              "does not span model.diff_with's pair)")
        check_choice("model.dtype", self.dtype, tuple(DTYPES))
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ConfigError("model.device", self.device, "auto, cpu, cuda, cuda:N or mps")
        if self.path is not None and not Path(str(self.path)).expanduser().is_dir():
            raise ConfigError("model.path", self.path, "an existing local model directory, or null to use model.name")
        if not self.path and not self.name:
            raise ConfigError("model.name", self.name, "a hub model name or a local directory")


@dataclass(frozen=True)
class DataSection:
    """The data fields every source shares (a source's own are its class's: DataSource.from_config and check)."""

    seed: Annotated[int, "an integer"]
    context_size: int
    batch_size: int
    buffer_tokens: int
    train_tokens: int
    normalize_tokens: int
    model_batch_size: int
    prefetch_batches: int
    eval_fraction: float
    normalize: str
    prepend_bos: bool
    cache: Any
    cache_dtype: str

    def validate(self) -> None:
        for name in ("context_size", "batch_size", "buffer_tokens", "train_tokens", "normalize_tokens",
                     "model_batch_size"):
            check_count(f"data.{name}", getattr(self, name))
        check_positive("data.prefetch_batches", self.prefetch_batches, allow_zero=True, integer=True)
        if self.buffer_tokens < 2 * self.batch_size:
            raise ConfigError("data.buffer_tokens", self.buffer_tokens, "at least 2 x data.batch_size")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError("data.eval_fraction", self.eval_fraction, "a fraction strictly between 0 and 1")
        check_choice("data.normalize", self.normalize, METHODS)
        check_choice("data.cache_dtype", self.cache_dtype, STORED_DTYPES)


@dataclass(frozen=True)
class OptimSection:
    """Adam and its learning-rate schedule (run/member.py)."""

    lr: float
    betas: list[float] | None
    lr_warmup_steps: int | None  # null: the SAE's recipe (SAE.recipe_lr_warmup_steps)
    lr_warmup: str
    lr_decay_fraction: float
    fused: bool

    def validate(self) -> None:
        check_positive("optim.lr", self.lr)
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise ConfigError("optim.betas", list(self.betas), "null or two numbers in [0, 1)")
        check_choice("optim.lr_warmup", self.lr_warmup, ("linear", "cosine"))
        if self.lr_warmup_steps is not None:
            check_positive("optim.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True, integer=True)
        if not 0 <= self.lr_decay_fraction < 1:
            raise ConfigError("optim.lr_decay_fraction", self.lr_decay_fraction, "a fraction in [0, 1)")


@dataclass(frozen=True)
class EvalSection:
    """The held-out evaluation (run/evaluation.py): at the end of a run, and every N steps."""

    tokens: int
    batch_size: int
    every_n_steps: int | None
    spliced_windows: int | None
    batch_topk: bool

    def validate(self) -> None:
        check_count("eval.tokens", self.tokens)
        check_count("eval.batch_size", self.batch_size)
        if self.every_n_steps is not None:
            check_count("eval.every_n_steps", self.every_n_steps)


@dataclass(frozen=True)
class TrainerSection:
    """The Trainer arguments saelab reads or checks; the section goes on to Lightning whole, which checks the rest."""

    accelerator: str
    devices: Any  # 1, "auto", "0,1", [0, 1]: checked by check_devices
    precision: Any  # saelab's auto | tf32, or any of Lightning's
    max_steps: int | None
    log_every_n_steps: int
    gradient_clip_val: float | None
    num_nodes: int = 1  # trainer=ddp sets it; Lightning's own default

    def validate(self) -> None:
        if self.max_steps is not None:
            check_count("trainer.max_steps", self.max_steps)
        check_precision(self.precision)
        check_devices(self.devices)
        check_count("trainer.num_nodes", self.num_nodes)


@dataclass(frozen=True)
class PathsSection:
    """Where runs and caches go."""

    output_dir: str
    cache_dir: str


def check_run_config(cfg: DictConfig) -> DataSource:
    """The whole config of one job, section by section, in one pass; returns the job's data source."""
    read_section("", RunSection, cfg, passthrough=True)
    read_section("l0_control", L0ControlConfig, cfg.l0_control)
    read_section("model", ModelSection, cfg.model)
    data = read_section("data", DataSection, cfg.data, passthrough=True)
    paths = read_section("paths", PathsSection, cfg.paths)
    source = build_source(cfg.data)  # the source's class, name and own fields (DataSource.check)
    cache_store(data.cache, paths.cache_dir, create=False)  # data.cache: off, auto, a directory or a URL
    _check_transcoder(cfg, source)
    read_section("optim", OptimSection, cfg.optim)
    read_section("eval", EvalSection, cfg.eval)
    read_section("trainer", TrainerSection, cfg.trainer, passthrough=True)
    return source


def _check_transcoder(cfg: DictConfig, source: DataSource) -> None:
    """model.target_hook makes a transcoder: it needs a model (a source read through one) and a hook other than its
    input; sae.d_out is then filled in from the model (saelab.run.training), and is null for an SAE."""
    target = cfg.model.target_hook
    if target is None:
        if cfg.sae.get("d_out") is not None:
            raise ConfigError("sae.d_out", cfg.sae.d_out, "null for an SAE (a transcoder's output width comes with "
                              "model.target_hook)")
        return
    if not source.needs_model:
        raise ConfigError("model.target_hook", target, f"null with data={source.name} (no model to read a target "
                          "from)")
    if isinstance(target, str) and str(target) in Sites.of(cfg.model.hook).reads:
        raise ConfigError("model.target_hook", target, "a hook other than model.hook")
