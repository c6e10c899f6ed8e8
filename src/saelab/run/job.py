"""One training job as Hydra sets it up: the resolved config and where its results go.

`prepare_job` runs inside Hydra's job context (a run, or one job of a multirun) and captures everything that
context provides, so the job can then train with others in one process (saelab.run.training) with no Hydra global
state: the config is resolved there, `${hydra:runtime.output_dir}` included.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saelab.data.sources import DataSource, build_source
from saelab.errors import ConfigError
from saelab.run import precision
from saelab.run.checkpoints import expect_own_checkpoints
from saelab.run.loggers import quiet_third_party
from saelab.run.schema import check_run_config
from saelab.run.world_sparsity import fit_sparsity_to_world
from saelab.sites import Sites

log = logging.getLogger("saelab")


def run_steps(cfg: DictConfig) -> int:
    """Optimiser steps of a run: trainer.max_steps, else data.train_tokens / data.batch_size (rounded up)."""
    return int(cfg.trainer.get("max_steps") or math.ceil(float(cfg.data.train_tokens) / int(cfg.data.batch_size)))


def activations_needed(cfg: DictConfig, world_size: int) -> int:
    """Training activations a run reads. Under DDP, data.batch_size and data.train_tokens are per device: each
    rank trains run_steps batches of its own, disjoint from the other ranks'."""
    return run_steps(cfg) * int(cfg.data.batch_size) * world_size


@dataclass
class Job:
    cfg: DictConfig  # the job's config, every interpolation resolved
    run_dir: Path
    overrides: list[str]  # the job's command-line overrides (recorded in metrics.json)
    multirun: bool
    num: int = 0  # hydra.job.num: labels the job in a group's log lines
    run_name: str | None = None  # the logger's run name (from the overrides)
    run_group: str | None = None  # the logger's group (the sweep directory in a multirun)
    resume_from: Path | None = None  # the checkpoint file this job continues from
    log_files: list[Path] = field(default_factory=list)  # Hydra's log file(s) for this job
    finished: dict | None = None  # a resumed sweep's job that had finished: its metrics.json, kept as its result

    @functools.cached_property
    def source(self) -> DataSource:
        """The job's data source (data._target_), made once."""
        return build_source(self.cfg.data)

    @property
    def sites(self) -> Sites:
        """The sites this job's SAE reads and writes (its source says: a model's hooks, a transcoder's target, or a
        source's own names for the activations it makes)."""
        return self.source.sites(self.cfg.model)

    @property
    def hook(self) -> str:
        """The (first) hook point this job's SAE reads."""
        return self.sites.hook

    @property
    def target_hook(self) -> str | None:
        """A transcoder's target (model.target_hook): the activation it predicts from `hook`'s. None: an SAE
        or a crosscoder (the schema refuses a target on a source without a model)."""
        return self.sites.target_hook

    @property
    def hooks_read(self) -> list[str]:
        """Every hook whose activations this job trains on: its input(s), and a transcoder's target."""
        return self.sites.hooks

    def sae_config(self) -> dict:
        """The SAE's config, with a transcoder's output width (the model's d_model: every trained hook has it) and
        a crosscoder's number of sites."""
        sae_cfg = OmegaConf.to_container(self.cfg.sae, resolve=True)
        if self.target_hook is not None and sae_cfg.get("d_out") is None:
            sae_cfg["d_out"] = int(sae_cfg["d_in"])  # d_model, or a generated world's width
        reads = len(self.sites.reads)
        if sae_cfg.get("sites", 1) not in (1, reads):
            raise ConfigError("sae.sites", sae_cfg["sites"], f"{reads}, the number of hooks in model.hook (it is "
                              "filled in from them)")
        sae_cfg["sites"] = reads
        return sae_cfg


def prepare_job(cfg: DictConfig) -> Job:
    """Check the config (ConfigError before any heavy work) and capture the job's Hydra context."""
    quiet_third_party()  # every job starts here (a run, a multirun job, a fanout job): before any Trainer exists
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    check_run_config(cfg)
    resolved = copy.deepcopy(cfg)
    OmegaConf.resolve(resolved)
    if "precision" in resolved.trainer:  # auto: what this machine runs (saelab.run.precision)
        resolved.trainer.precision = precision.resolve(resolved.trainer.precision,
                                                       resolved.trainer.get("accelerator", "auto"))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    shown = [o for o in overrides if not o.startswith(("paths.", "hydra", "logger"))]
    root = logging.getLogger()
    finished = finished_metrics(cfg.get("ckpt_path"), run_dir, multirun)
    job = Job(
        cfg=resolved, run_dir=run_dir, overrides=overrides, multirun=multirun,
        num=int(hydra_cfg.job.get("num") or 0) if multirun else 0,
        run_name=",".join(shown)[:120] or None,
        run_group=hydra_cfg.sweep.dir if multirun else None,
        resume_from=None if finished is not None else resume_path(cfg.get("ckpt_path"), run_dir, multirun),
        log_files=[Path(h.baseFilename) for h in root.handlers if isinstance(h, logging.FileHandler)],
        finished=finished,
    )
    if finished is not None:
        log.info("job %d finished before (%s): its result is kept, it is not trained again", job.num,
                 run_dir / "metrics.json")
    if job.resume_from is not None and job.resume_from.resolve().parent == (run_dir / "checkpoints").resolve():
        expect_own_checkpoints(run_dir / "checkpoints")
    fit_sparsity_to_world(job.cfg, overrides, job.source)
    check_sae_config(job)
    return job


def check_sae_config(job: Job) -> None:
    """Run the variant's own validation (SAEConfig.validate) while the job is set up, so a sweep refuses a bad
    job up front and alone, before grouping sizes its SAE or anything heavy starts. The SAE is built on the meta
    device (no weights allocated), so any error the build raises is the job's, reported here."""
    import torch

    from saelab.saes.base import build_sae

    with torch.device("meta"):
        sae = build_sae(job.sae_config())
    signed = job.cfg.get("l0_control", {}).get("signed")
    if signed and "sparsity" in sae.scheduled_coefficients and not sae.signed_sparsity_coefficient:
        raise ConfigError("l0_control.signed", signed, f"null or false for {type(sae).__name__} with sae.sparsity="
                          f"{getattr(sae.cfg, 'sparsity', None)} (a negative coefficient is meaningful only for "
                          "JumpReLU's L0 count)")


def resume_path(ckpt_path: str | None, run_dir: Path, multirun: bool = False) -> Path | None:
    """`last` means this run directory's checkpoints/last.ckpt. A run must have it (resume where it stopped); a
    sweep's job killed before its first checkpoint has none and starts from scratch, so that one command resumes
    a whole sweep."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path).expanduser()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file() and multirun:
        log.info("no checkpoint in %s: this job starts from scratch", last.parent)
        return None
    if not last.is_file():
        raise ConfigError("ckpt_path", "last", f"a run directory with a checkpoint ({last} does not exist); "
                          "pass hydra.run.dir=<the run to resume>")
    return last


def finished_metrics(ckpt_path: str | None, run_dir: Path, multirun: bool) -> dict | None:
    """A sweep resumed with ckpt_path=last keeps the jobs that finished: a job's metrics.json (written last, and
    atomically) says it did, and is its result. A single run is resumed only when asked, so it is never skipped."""
    metrics = run_dir / "metrics.json"
    if not multirun or ckpt_path != "last" or not metrics.is_file():
        return None
    return json.loads(metrics.read_text())


def record_failure(run_dir: Path, err: BaseException) -> None:
    """A failed job keeps its error in its own directory; a sweep goes on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
    log.error("job failed (%s: %s); details in %s", type(err).__name__, err, run_dir / "error.txt")


def report_failure(run_dir: Path, err: BaseException) -> None:
    """A multirun job's failure: its error on stderr (for a config error, the usual one line) and error.txt."""
    import sys

    if isinstance(err, ConfigError):
        print(f"error: {err}", file=sys.stderr)
    record_failure(run_dir, err)
