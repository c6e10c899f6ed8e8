"""Train a group of jobs on one activation stream, in lockstep: the one training path of saelab.

A plain run is a group of one; `hydra/launcher=fanout` (saelab.run.grouping) passes groups of jobs whose activation
source is the same. The model is loaded once (with every member's hook), the stream runs it once per batch,
and every member's SAE takes its step on that batch. Each job keeps its own directory and results:
checkpoints (one file per job, saelab.run.checkpoints), logger run, metrics.json and SAELens export. A job that
fails (a config error found here, a non-finite loss under nan_policy=stop) fails alone: the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from saelab.errors import ConfigError
from saelab.run import precision
from saelab.run.checkpoints import GroupCheckpointIO
from saelab.run.evaluation import (
    batch_topk_metrics,
    held_out_metrics,
    normalised_splice,
    spliced,
    spliced_hooks,
)
from saelab.run.grouping import shared_config
from saelab.run.job import Job, activations_needed, run_steps
from saelab.run.loggers import build_loggers, close_loggers
from saelab.run.member import MEMBER_PRECISIONS, SAEMember
from saelab.run.module import SAEModule
from saelab.run.periodic_eval import PeriodicEval
from saelab.run.results import log_final, write_results
from saelab.run.stream import Reader, Stream, open_stream
from saelab.saes.base import build_sae
from saelab.saes.saelens_format import check_importable, import_sae

log = logging.getLogger("saelab")
Outcome = dict[str, Any] | BaseException  # a job's metrics, or why it failed


def world_size(cfg: DictConfig) -> int:
    """The number of training processes the configured Trainer would run (building it starts none)."""
    trainer_cfg = precision.for_lightning(OmegaConf.to_container(cfg.trainer, resolve=True) | {"max_steps": 1})
    return int(instantiate(trainer_cfg, logger=False, enable_checkpointing=False).world_size)


def train_group(jobs: Sequence[Job]) -> list[Outcome]:
    """Train `jobs` together; return each job's metrics (also written to its metrics.json) or its error.

    Read top-down: build the SAEs, open the stream, build the members, build the Trainer, fit, finish; each
    stage returns what the next takes. A job's own error stops that job alone; an error of the whole group
    (model, data, the Trainer) is every remaining job's outcome.
    """
    started = time.time()
    with _job_logs(jobs):
        saes, outcomes = _build_saes(jobs)
        if saes:
            try:
                outcomes |= _train_saes(jobs, saes, started)
            except Exception as err:  # the group failed as a whole: each job still running records why
                outcomes |= {i: err for i in saes if i not in outcomes}
    return [outcomes[i] for i in range(len(jobs))]


def _build_saes(jobs: Sequence[Job]) -> tuple[dict[int, Any], dict[int, Outcome]]:
    """Each job's SAE, initialised from its own seed as in a run by itself, and the jobs refused here."""
    saes: dict[int, Any] = {}
    errors: dict[int, Outcome] = {}
    for i, job in enumerate(jobs):
        try:
            L.seed_everything(int(job.cfg.seed), workers=True, verbose=False)
            saes[i] = build_sae(job.sae_config())
            if job.cfg.get("init_from"):  # its layout and sizes, before the model loads
                check_importable(saes[i], Path(job.cfg.init_from))
        except ConfigError as err:
            errors[i] = err
    return saes, errors


def _train_saes(jobs: Sequence[Job], saes: dict[int, Any], started: float) -> dict[int, Outcome]:
    """Train the built SAEs on one stream and finish them; {job index: outcome} for every SAE."""
    first = shared_config(jobs)  # the group's settings: only what grouping says its jobs share
    max_steps, world = run_steps(first), world_size(first)
    if world > 1 and any(jobs[i].cfg.get("nan_policy") == "skip" for i in saes):  # a rank that skipped its
        raise ConfigError("nan_policy", "skip", "stop when training on several devices")  # backward would hang
    precision.apply(first.trainer.get("precision"))  # TF32 matmuls or not: the whole group's, the model's too
    readers = [Reader(jobs[i].hook, jobs[i].target_hook, saes[i].d_in // saes[i].n_sites,
                      saes[i].d_out // len(jobs[i].sites.writes),
                      sites=jobs[i].sites) for i in saes]
    stream, misfits = open_stream(first, readers, activations_needed(first, world), source=jobs[0].source)
    outcomes: dict[int, Outcome] = {list(saes)[k]: err for k, err in misfits.items()}
    live = [i for i in saes if i not in outcomes]  # a job whose hook or width does not fit the stream fails alone
    if stream is None:
        return outcomes
    members = [_member(jobs[i], saes[i], max_steps, stream) for i in live]
    module = SAEModule(members)
    trainer, resume_from = _build_trainer(first, [jobs[i] for i in live], module, stream, max_steps)
    # Loggers start last, so a config rejected during set-up leaves no logger files behind.
    for i, member in zip(live, members, strict=True):
        member.loggers = build_loggers(jobs[i].cfg.get("logger"), jobs[i].run_dir, jobs[i].run_name,
                                       jobs[i].run_group)
    try:
        setup_s = time.time() - started
        train_s = _fit(trainer, module, stream, resume_from)
        outcomes |= {i: m.failure for i, m in zip(live, members, strict=True) if not m.alive}
        if not trainer.is_global_zero:  # under DDP the other ranks hold the same weights; rank 0 reports
            return outcomes | {i: {"global_rank": trainer.global_rank, "steps": int(trainer.global_step)}
                               for i in live if i not in outcomes}
        eval_started = time.time()
        finishing = [(i, m) for i, m in zip(live, members, strict=True) if m.alive]
        outcomes |= _finish(jobs, first, finishing, stream, trainer, world, started)
        log.info("group of %d job(s): set-up %.1f s, training %.1f s (%d steps), evaluation %.1f s", len(jobs),
                 setup_s, train_s, int(trainer.global_step), time.time() - eval_started)
    finally:
        for member in members:
            close_loggers(member.loggers, "success" if member.alive else "failed")
    return outcomes


def _build_trainer(cfg: DictConfig, jobs: Sequence[Job], module: SAEModule, stream: Stream,
                   max_steps: int) -> tuple[L.Trainer, str | None]:
    """The group's Trainer: the configured callbacks, the periodic held-out evaluation on the group's stream, and
    the checkpoint I/O writing one file per job; and the checkpoint to resume from (None: a fresh start)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.eval.every_n_steps:  # the held-out evaluation of the end of the run, every N steps
        callbacks.append(PeriodicEval(cfg.eval.every_n_steps, cfg.eval.batch_size, stream))
    checkpoint_io = GroupCheckpointIO([job.run_dir / "checkpoints" for job in jobs], alive=module.alive_members,
                                      resume_from=_resume_paths(jobs))
    trainer = instantiate(_trainer_config(cfg, max_steps), logger=False, callbacks=callbacks,
                          default_root_dir=str(jobs[0].run_dir), plugins=[checkpoint_io])
    return trainer, _first(checkpoint_io.resume_from)


def _fit(trainer: L.Trainer, module: SAEModule, stream: Stream, resume_from: str | None) -> float:
    """Fit the group; an error that is not one member's own failure is every live member's. Returns seconds."""
    fit_started = time.time()
    try:
        # weights_only: a checkpoint is tensors and plain values; loading one cannot run code.
        trainer.fit(module, datamodule=stream.datamodule, ckpt_path=resume_from, weights_only=True)
    except Exception as err:
        if any(m.alive for m in module.members):  # the group stopped with an error: it is every member's
            for member in module.members:
                member.failure = member.failure or err
        # else every member's own failure ended the run, and each is its job's outcome (member.failure)
    return time.time() - fit_started


def _finish(jobs: Sequence[Job], cfg: DictConfig, finishing: list[tuple[int, SAEMember]], stream: Stream,
            trainer: L.Trainer, world: int, started: float) -> dict[int, Outcome]:
    """Evaluate the members that trained to the end; write each job's metrics.json, export and logs."""
    results = _evaluate(cfg, finishing, stream)
    outcomes: dict[int, Outcome] = {}
    for i, member in finishing:
        metrics, log10_density = results[i]
        outcomes[i] = write_results(jobs[i], member, metrics, stream, trainer, world, started)
        log_final(member.loggers, metrics, log10_density, int(trainer.global_step))
    return outcomes


def _trainer_config(cfg: DictConfig, max_steps: int) -> dict[str, Any]:
    """The group's Trainer arguments: the first job's, with precision and clipping left to the members where
    they apply them themselves (saelab.run.member.SAEMember)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["max_steps"] = int(max_steps)
    if trainer_cfg["precision"] in MEMBER_PRECISIONS:
        trainer_cfg["precision"] = "32-true"
    trainer_cfg = precision.for_lightning(trainer_cfg)
    trainer_cfg["gradient_clip_val"] = None
    return trainer_cfg


def _member(job: Job, sae, max_steps: int, stream: Stream) -> SAEMember:
    cfg, scales, sites = job.cfg, stream.datamodule.scales, job.sites
    scale = scales[job.hook]
    input_rms = math.sqrt(sum(stream.datamodule.input_rms[h] ** 2 for h in sites.reads))  # sites side by side
    for name, (given, used) in sae.adapt_to_input_scale(input_rms).items():
        log.info("%ssae.%s = %.4g (in units of E||x||^2 = 1) -> %.4g for data.normalize=%s (inputs' rms %.4g)",
                 f"job {job.num}: " if job.multirun else "", name, given, used, cfg.data.normalize, input_rms)
    member = SAEMember(sae, cfg.optim, max_steps, cfg.dead_window_tokens, str(cfg.nan_policy),
                       compile=bool(cfg.compile), sites=sites,
                       precision=cfg.trainer.precision,
                       gradient_clip_val=cfg.trainer.get("gradient_clip_val"), name=str(job.num),
                       l0_control=cfg.get("l0_control"))
    member.norm_scale.fill_(scale)
    site_scales = [scales[h] for h in sites.scaled] if sites.several else None
    if site_scales is not None:
        member.site_scales.copy_(torch.tensor(site_scales, dtype=torch.float64))
    target_scale = scales[job.target_hook] if job.target_hook is not None else None
    if target_scale is not None:
        member.target_scale.fill_(target_scale)
    if cfg.get("init_from"):  # fine-tuning: the export's function, on this run's normalised activations
        import_sae(sae, Path(cfg.init_from), scale, target_scale, site_scales)
        log.info("%sinitialised from %s", f"job {job.num}: " if job.multirun else "", cfg.init_from)
    return member


def _resume_paths(jobs: Sequence[Job]) -> list | None:
    paths = [job.resume_from for job in jobs]
    if all(p is None for p in paths):
        return None
    if any(p is None for p in paths):
        raise ConfigError("ckpt_path", None, "the same for every job of a group (all null, or all resuming)")
    return paths


def _first(paths: list | None) -> str | None:
    return str(paths[0]) if paths else None


def _evaluate(cfg: DictConfig, finishing: list[tuple[int, SAEMember]], stream: Stream
              ) -> dict[int, tuple[dict[str, Any], Any]]:
    """Held-out metrics per job (the group shares its eval config); spliced ones share the clean passes."""
    results = {i: held_out_metrics(m.sae, stream, m.sites, int(cfg.eval.batch_size)) for i, m in finishing}
    if cfg.eval.get("batch_topk"):  # BatchTopK and Matryoshka also by their training selection
        for i, m in finishing:
            results[i][0].update(batch_topk_metrics(m.sae, stream, m.sites, int(cfg.eval.batch_size)))
    splices = {i: (spliced_hooks(m.sites), normalised_splice(m.sae, m.sites, stream.datamodule.scales))
               for i, m in finishing}
    for i, metrics in spliced(stream, splices, int(cfg.eval.spliced_windows or 0),
                              int(cfg.data.model_batch_size)).items():
        results[i][0].update(metrics)
    return results


@contextlib.contextmanager
def _job_logs(jobs: Sequence[Job]) -> Iterator[None]:
    """Every job's log file receives the group's log lines (a job of one already has its own)."""
    root = logging.getLogger()
    present = {getattr(h, "baseFilename", None) for h in root.handlers}
    formatter = next((h.formatter for h in root.handlers if isinstance(h, logging.FileHandler)),
                     logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    added = []
    for path in dict.fromkeys(p for job in jobs for p in job.log_files):
        if str(path) not in present:
            handler = logging.FileHandler(path, mode="a")
            handler.setFormatter(formatter)
            root.addHandler(handler)
            added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
