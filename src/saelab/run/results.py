"""What a finished job leaves: its SAELens export, metrics.json (and the ground truth where the source knows
it), and its final metrics in its loggers."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from safetensors.torch import save_file

from saelab.data.sources import DataSource
from saelab.io import write_json
from saelab.run.job import Job
from saelab.run.member import SAEMember
from saelab.run.stream import Stream
from saelab.saes.circuit_tracer_format import export_circuit_tracer
from saelab.saes.circuit_tracer_format import refusal as ct_refusal
from saelab.saes.decoder_rescale import variant_class
from saelab.saes.saelens_format import export_sae
from saelab.sites import Sites

log = logging.getLogger("saelab")


def export_metadata(cfg: DictConfig, source: DataSource, hook: str, target_hook: str | None,
                    sites: Sites | None = None) -> dict[str, Any]:
    """The `metadata` of the export's cfg.json: SAELens's fields, plus saelab's own.

    `has_model` (bool) says whether a model made the activations the SAE was trained on: false for a source that
    makes them itself (data=synthetic, data=synthsaebench), whose name then stands in for model_name and
    dataset_path. It is said outright so that a reader (saelab-dashboard, which shows contexts of real text
    and refuses such an SAE: dashboard/plan.trained_without_model) need not infer it from those names.
    """
    has_model = bool(source.needs_model)
    return {
        "model_name": str(cfg.model.name) if has_model else source.name,
        "hook_name": hook,
        **({"hook_name_out": target_hook} if target_hook is not None else {}),
        **({"hook_names": list(sites.reads)} if sites is not None and sites.several else {}),
        **({"hook_names_out": list(sites.writes)} if sites is not None and sites.cross_layer else {}),
        **({"diff_with": str(cfg.model.diff_with)} if has_model and cfg.model.get("diff_with") else {}),
        "context_size": int(cfg.data.context_size),
        "prepend_bos": bool(cfg.data.prepend_bos),
        "exclude_special_tokens": True,
        "dataset_path": str(cfg.data.get("path") or source.name) if has_model else source.name,
        "normalization": str(cfg.data.normalize),
        "has_model": has_model,
        "trained_by": "saelab",
    }


def write_results(job: Job, member: SAEMember, metrics: dict[str, Any], stream: Stream, trainer: L.Trainer,
                  world: int, started: float) -> dict[str, Any]:
    """The job's SAELens export and metrics.json; returns the metrics written."""
    cfg, sae, scales = job.cfg, member.sae, stream.datamodule.scales
    scale = scales[member.hook]
    truth = stream.truth
    if truth is not None:  # the truth this SAE is measured against, with the run
        save_file(truth.tensors(), str(job.run_dir / "ground_truth.safetensors"))
    target_scale = scales[member.target_hook] if member.target_hook is not None else None
    sites = member.sites
    site_scales = [float(scales[h]) for h in sites.scaled] if sites.several else None
    export_sae(sae, scale, job.run_dir / "sae",
               export_metadata(cfg, stream.source, member.hook, member.target_hook, sites), target_scale, site_scales)
    if sites.cross_layer:
        write_circuit_tracer(sae, scale, site_scales, sites, job, stream)
    result = {
        **metrics,
        "variant": variant_class(sae).__name__,
        "architecture": sae.exported_config()["architecture"],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"target_hook": member.target_hook, "d_out": sae.d_out,
            "target_normalization_scale": float(target_scale)} if member.target_hook is not None else {}),
        **({"sites": list(sites.scaled), "site_normalization_scales": site_scales} if sites.several else {}),
        **({"cross_layer": bool(sae.cfg.cross_layer)} if sites.cross_layer else {}),
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


def write_circuit_tracer(sae, scale: float, site_scales: list[float], sites: Sites, job: Job, stream: Stream) -> None:
    """A cross-layer transcoder also in circuit-tracer's format (<run>/circuit_tracer), where it can be."""
    architecture = sae.exported_config()["architecture"]
    why_not = ct_refusal(architecture) if sae.cfg.cross_layer else "per-layer transcoders (sae.cross_layer=false)"
    if why_not is not None:
        log.info("%sno circuit-tracer export: %s", f"job {job.num}: " if job.multirun else "", why_not)
        return
    model_name = str(job.cfg.model.name) if stream.source.needs_model else stream.source.name
    export_circuit_tracer(sae.exported_tensors(scale, None, site_scales), sae.n_sites, job.run_dir / "circuit_tracer",
                          sites.reads, sites.writes, model_name)


def log_final(loggers: list, metrics: dict[str, Any], log10_density: torch.Tensor, step: int) -> None:
    """The held-out metrics as final/<name> in each logger (W&B also gets the firing-density histogram)."""
    numeric = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_metrics(numeric, step=step)
        experiment = getattr(logger, "experiment", None)
        if isinstance(logger, WandbLogger) and experiment is not None:
            import wandb

            finite = log10_density[torch.isfinite(log10_density)].numpy()
            experiment.log({"final/log10_feature_density": wandb.Histogram(finite)}, step=step)
            experiment.summary.update(numeric)
