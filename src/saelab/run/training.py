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
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from saelab.data.datamodule import ActivationDataModule
from saelab.data.model import LoadedModel, check_sae_hooks, hook_widths, load_model
from saelab.data.synthetic_datamodule import SyntheticDataModule
from saelab.errors import ConfigError
from saelab.io import write_json
from saelab.metrics.evaluate import evaluate_sae
from saelab.metrics.ground_truth import ground_truth_metrics
from saelab.metrics.spliced import Splice, Transcode, spliced_metrics_many
from saelab.run import precision
from saelab.run.checkpoints import GroupCheckpointIO
from saelab.run.job import Job
from saelab.run.loggers import build_loggers, close_loggers
from saelab.run.module import MEMBER_PRECISIONS, SAEMember, SAEModule
from saelab.run.periodic_eval import PeriodicEval
from saelab.saes.base import build_sae
from saelab.saes.saelens_format import check_importable, export_sae, import_sae

log = logging.getLogger("saelab")
Outcome = dict[str, Any] | BaseException  # a job's metrics, or why it failed


def run_steps(cfg: DictConfig) -> int:
    """Optimiser steps of a run: trainer.max_steps, else data.train_tokens / data.batch_size (rounded up)."""
    return int(cfg.trainer.get("max_steps") or math.ceil(float(cfg.data.train_tokens) / int(cfg.data.batch_size)))


def activations_needed(cfg: DictConfig, world_size: int) -> int:
    """Training activations a run reads. Under DDP, data.batch_size and data.train_tokens are per device: each
    rank trains run_steps batches of its own, disjoint from the other ranks'."""
    return run_steps(cfg) * int(cfg.data.batch_size) * world_size


def train_group(jobs: Sequence[Job]) -> list[Outcome]:
    """Train `jobs` together; return each job's metrics (also written to its metrics.json) or its error."""
    started = time.time()
    outcomes: list[Outcome | None] = [None] * len(jobs)
    with _job_logs(jobs):
        try:
            _train(jobs, outcomes, started)
        except Exception as err:  # a failure of the whole group (model, data, the Trainer): every job has it
            for i, outcome in enumerate(outcomes):
                if outcome is None:
                    outcomes[i] = err
    return outcomes  # type: ignore[return-value]


def _train(jobs: Sequence[Job], outcomes: list[Outcome | None], started: float) -> None:
    first = jobs[0].cfg
    max_steps = run_steps(first)
    saes = {}
    for i, job in enumerate(jobs):  # each SAE initialised from its own seed, as in a run by itself
        try:
            L.seed_everything(int(job.cfg.seed), workers=True, verbose=False)
            saes[i] = build_sae(job.sae_config())
            if job.cfg.get("init_from"):  # its layout and sizes, before the model loads
                check_importable(saes[i], Path(job.cfg.init_from))
        except ConfigError as err:
            outcomes[i] = err
    model = _load_model(jobs, saes, outcomes)
    live = [i for i in saes if outcomes[i] is None]
    if not live:
        return

    callbacks = [instantiate(c) for c in (first.get("callbacks") or {}).values()]
    if first.eval.every_n_steps:
        callbacks.append(PeriodicEval(first.eval.every_n_steps, first.eval.batch_size))
    checkpoint_io = GroupCheckpointIO([jobs[i].run_dir / "checkpoints" for i in live],
                                      alive=lambda: [m.alive for m in module.members],
                                      resume_from=_resume_paths([jobs[i] for i in live]))
    precision.apply(first.trainer.get("precision"))  # TF32 matmuls or not: the whole group's
    trainer = instantiate(_trainer_config(first, max_steps), logger=False, callbacks=callbacks,
                          default_root_dir=str(jobs[live[0]].run_dir), plugins=[checkpoint_io])
    world = int(trainer.world_size)
    if world > 1 and any(jobs[i].cfg.get("nan_policy") == "skip" for i in live):  # a rank that skipped its
        raise ConfigError("nan_policy", "skip", "stop when training on several devices")  # backward would hang
    if model is None:  # data=synthetic: generated, with its ground truth
        datamodule = SyntheticDataModule(first.data, first.eval.tokens, first.seed, hooks=[jobs[i].hook for i in live])
    else:
        datamodule = ActivationDataModule(first.data, model, first.eval.tokens, first.seed,
                                          cache_dir=first.paths.cache_dir,
                                          train_tokens=activations_needed(first, world), hooks=model.hooks)
    datamodule.setup()
    members = [_member(jobs[i], saes[i], max_steps, datamodule) for i in live]
    module = SAEModule(members)
    # Loggers start last, so a config rejected during set-up leaves no logger files behind.
    for i, member in zip(live, members, strict=True):
        member.loggers = build_loggers(jobs[i].cfg.get("logger"), jobs[i].run_dir, jobs[i].run_name,
                                       jobs[i].run_group)
    setup_s = time.time() - started
    fit_started = time.time()
    try:
        try:
            # weights_only: a checkpoint is tensors and plain values; loading one cannot run code.
            trainer.fit(module, datamodule=datamodule, ckpt_path=_first(checkpoint_io.resume_from),
                        weights_only=True)
        except Exception as err:
            if any(m.alive for m in members):  # not a member's own failure: the group stopped with an error
                for member in members:
                    member.failure = member.failure or err
        train_s = time.time() - fit_started
        for i, member in zip(live, members, strict=True):
            if not member.alive:
                outcomes[i] = member.failure
        if not trainer.is_global_zero:  # under DDP the other ranks hold the same weights; rank 0 reports
            for i in live:
                outcomes[i] = outcomes[i] or {"global_rank": trainer.global_rank, "steps": int(trainer.global_step)}
            return
        eval_started = time.time()
        finishing = [(i, m) for i, m in zip(live, members, strict=True) if m.alive]
        results = _evaluate(jobs, finishing, model, datamodule)
        for i, member in finishing:
            metrics, log10_density = results[i]
            outcomes[i] = _write_results(jobs[i], member, metrics, datamodule, trainer, world, started)
            _log_final(member.loggers, metrics, log10_density, int(trainer.global_step))
        log.info("group of %d job(s): set-up %.1f s, training %.1f s (%d steps), evaluation %.1f s", len(jobs),
                 setup_s, train_s, int(trainer.global_step), time.time() - eval_started)
    finally:
        for member in members:
            close_loggers(member.loggers, "success" if member.alive else "failed")


def _load_model(jobs: Sequence[Job], saes: dict[int, Any], outcomes: list[Outcome | None]) -> LoadedModel | None:
    """The model, loaded once with every member's hook; a member whose hook or width does not fit fails alone."""
    live = [i for i in saes if outcomes[i] is None]
    if not live:
        return None
    if jobs[live[0]].cfg.data.source == "synthetic":  # no model; the SAE reads the world's d_in
        d_in = int(jobs[live[0]].cfg.data.synthetic.d_in)
        for i in live:
            if saes[i].d_in != d_in:
                outcomes[i] = ConfigError("sae.d_in", saes[i].d_in, f"data.synthetic.d_in ({d_in})")
        return None
    hooks = list(dict.fromkeys(h for i in live for h in jobs[i].hooks_read))
    model = load_model(jobs[live[0]].cfg.model, hooks=hooks, check_hooks=False)
    widths = hook_widths(model, [h for h in hooks if h in model.bridge.hook_dict])
    for i in live:
        try:
            check_sae_hooks(model, widths, jobs[i].hook, jobs[i].target_hook, saes[i].d_in)
            if jobs[i].target_hook is not None and saes[i].d_out != model.d_model:
                raise ConfigError("sae.d_out", saes[i].d_out, f"null or the model's d_model ({model.d_model})")
        except ConfigError as err:
            outcomes[i] = err
    model.hooks = list(dict.fromkeys(h for i in live if outcomes[i] is None for h in jobs[i].hooks_read)) or hooks
    return model


def _trainer_config(cfg: DictConfig, max_steps: int) -> dict[str, Any]:
    """The group's Trainer arguments: the first job's, with precision and clipping left to the members where
    they apply them themselves (saelab.run.module.SAEMember)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["max_steps"] = int(max_steps)
    if trainer_cfg.get("precision", "32-true") in MEMBER_PRECISIONS:
        trainer_cfg["precision"] = "32-true"
    trainer_cfg = precision.for_lightning(trainer_cfg)
    trainer_cfg["gradient_clip_val"] = None
    return trainer_cfg


def _member(job: Job, sae, max_steps: int, datamodule) -> SAEMember:
    cfg, scale, input_rms = job.cfg, datamodule.scales[job.hook], datamodule.input_rms[job.hook]
    for name, (given, used) in sae.adapt_to_input_scale(input_rms).items():
        log.info("%ssae.%s = %.4g (in units of E||x||^2 = 1) -> %.4g for data.normalize=%s (inputs' rms %.4g)",
                 f"job {job.num}: " if job.multirun else "", name, given, used, cfg.data.normalize, input_rms)
    member = SAEMember(sae, cfg.optim, max_steps, cfg.dead_window_tokens, str(cfg.get("nan_policy", "stop")),
                       compile=bool(cfg.get("compile", False)), hook=job.hook, target_hook=job.target_hook,
                       precision=cfg.trainer.get("precision", "32-true"),
                       gradient_clip_val=cfg.trainer.get("gradient_clip_val"), name=str(job.num))
    member.norm_scale.fill_(scale)
    target_scale = datamodule.scales[job.target_hook] if job.target_hook is not None else None
    if target_scale is not None:
        member.target_scale.fill_(target_scale)
    if cfg.get("init_from"):  # fine-tuning: the export's function, on this run's normalised activations
        import_sae(sae, Path(cfg.init_from), scale, target_scale)
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


def _evaluate(jobs: Sequence[Job], finishing: list[tuple[int, SAEMember]], model: LoadedModel,
              datamodule: ActivationDataModule) -> dict[int, tuple[dict[str, Any], torch.Tensor]]:
    """Held-out metrics per job; the spliced metrics share the clean and zero-ablated passes per hook."""
    results = {}
    truth = getattr(datamodule, "world", None)  # a source that knows its features (data=synthetic)
    for i, member in finishing:
        firing: list[torch.Tensor] | None = [] if truth is not None else None
        targets = datamodule.eval_acts[member.target_hook] if member.target_hook is not None else None
        metrics, density = evaluate_sae(member.sae, datamodule.eval_acts[member.hook],
                                        int(jobs[i].cfg.eval.batch_size), firing, targets)
        if truth is not None:  # how well the SAE recovers them, from the same held-out encode
            metrics |= ground_truth_metrics(member.sae.W_dec, torch.cat(firing), truth.dictionary,
                                            datamodule.eval_firing, truth.parent)
        results[i] = (metrics, density)
    spliced = [(i, m) for i, m in finishing if jobs[i].cfg.eval.spliced_windows and model is not None]
    for hook in dict.fromkeys(m.spliced_hook for _, m in spliced):
        on_hook = [(i, m) for i, m in spliced if m.spliced_hook == hook]
        n_windows = int(jobs[on_hook[0][0]].cfg.eval.spliced_windows)
        reconstructs = {i: _splice(m, datamodule.scales) for i, m in on_hook}
        by_job = spliced_metrics_many(model, reconstructs, datamodule.eval_windows[:n_windows], datamodule.special,
                                      int(jobs[on_hook[0][0]].cfg.data.model_batch_size), hook)
        for i, metrics in by_job.items():
            results[i][0].update(metrics)
    return results


def _splice(member: SAEMember, scales: dict[str, float]) -> Splice:
    """Raw activations in, raw output out: x -> C sae(x / C) for an SAE; a transcoder reads its input hook and
    predicts its target, x -> C_target sae(x / C_input)."""
    sae, in_scale = member.sae, scales[member.hook]
    out_scale = scales[member.target_hook] if member.target_hook is not None else in_scale
    device = next(sae.parameters()).device
    sae.eval()

    def predict(x):
        with torch.no_grad():
            return sae(x.to(device).float() / in_scale) * out_scale

    return predict if member.target_hook is None else Transcode(predict, reads=member.hook)


def _write_results(job: Job, member: SAEMember, metrics: dict[str, Any], datamodule: ActivationDataModule,
                   trainer: L.Trainer, world: int, started: float) -> dict[str, Any]:
    """The job's SAELens export and metrics.json."""
    cfg, sae, scale = job.cfg, member.sae, datamodule.scales[member.hook]
    truth = getattr(datamodule, "world", None)
    if truth is not None:  # the truth this SAE is measured against, with the run
        save_file(truth.tensors(), str(job.run_dir / "ground_truth.safetensors"))
    target_scale = datamodule.scales[member.target_hook] if member.target_hook is not None else None
    export_sae(sae, scale, job.run_dir / "sae", {
        "model_name": "synthetic" if truth is not None else str(cfg.model.name),
        "hook_name": member.hook,
        **({"hook_name_out": member.target_hook} if member.target_hook is not None else {}),
        "context_size": int(cfg.data.context_size),
        "prepend_bos": bool(cfg.data.prepend_bos),
        "exclude_special_tokens": True,
        "dataset_path": str(cfg.data.get("path") or cfg.data.source),
        "normalization": str(cfg.data.normalize),
        "trained_by": "saelab",
    }, target_scale)
    result = {
        **metrics,
        "variant": sae.__class__.__name__,
        "architecture": sae.exported_config()["architecture"],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"target_hook": member.target_hook, "d_out": sae.d_out,
            "target_normalization_scale": float(target_scale)} if member.target_hook is not None else {}),
        "steps": int(trainer.global_step),
        "tokens_trained": int(trainer.global_step) * int(cfg.data.batch_size) * world,
        "world_size": world,
        "normalization_scale": float(scale),
        "wall_time_s": time.time() - started,
        "overrides": job.overrides,
    }
    if member.target_l0 is not None:  # what the controller asked for and the coefficient it ended with
        result["target_l0"] = float(member.target_l0)
        result["sparsity_coefficient_reached"] = float(member.coefficients(int(trainer.global_step))["sparsity"])
    write_json(job.run_dir / "metrics.json", result)
    log.info("%sheld-out: L0 %.1f, FVU %.3f, shrinkage %.3f, dead %.1f%%; %d tokens in %.0f s -> %s",
             f"job {job.num}: " if job.multirun else "", metrics["l0"], metrics["fvu"], metrics["shrinkage"],
             100 * metrics["dead_fraction"], result["tokens_trained"], result["wall_time_s"], job.run_dir)
    return result


def _log_final(loggers: list, metrics: dict[str, Any], log10_density: torch.Tensor, step: int) -> None:
    numeric = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_metrics(numeric, step=step)
        experiment = getattr(logger, "experiment", None)
        if isinstance(logger, WandbLogger) and experiment is not None:
            import wandb

            finite = log10_density[torch.isfinite(log10_density)].numpy()
            experiment.log({"final/log10_feature_density": wandb.Histogram(finite)}, step=step)
            experiment.summary.update(numeric)


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
