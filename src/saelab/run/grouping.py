"""Grouping the jobs of a multirun for `hydra/launcher=fanout`: which jobs can share one activation stream.

Jobs share a stream when everything that decides the batches, their order and the training loop is equal:
the model (not its hook), the data config (and the seed that orders the activations: data.seed, else the
run's seed), the step count,
the Trainer's loop settings, the checkpoint and evaluation settings, and the checkpoint step a job resumes
from. Everything else (variant, coefficients, width, optimiser, initialisation seed, hook, precision among
32-true/bf16-mixed, logger) is the job's own. A group is split when it exceeds `max_saes_per_group`, or when
the estimated memory of its SAEs exceeds the device's free memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from saelab.data.model import resolve_device
from saelab.errors import ConfigError
from saelab.run.job import Job, run_steps
from saelab.run.member import MEMBER_PRECISIONS
from saelab.saes.base import sae_config

log = logging.getLogger("saelab")
_OWN_TRAINER_FIELDS = ("gradient_clip_val",)  # applied per member
SHARED_SECTIONS = ("model", "data", "trainer", "callbacks", "eval", "paths")  # shared_config: what a group reads


def group_key(job: Job) -> str:
    """Jobs with equal keys train in one group (see the module docstring)."""
    cfg = OmegaConf.to_container(job.cfg, resolve=True)
    run_dir = str(job.run_dir)

    def own_paths(value: Any) -> Any:  # the job's directory is its own; equal configs differ only by it
        if isinstance(value, str):
            return value.replace(run_dir, "<run dir>")
        if isinstance(value, dict):
            return {k: own_paths(v) for k, v in value.items()}
        if isinstance(value, list):
            return [own_paths(v) for v in value]
        return value

    trainer = {k: v for k, v in cfg["trainer"].items() if k not in _OWN_TRAINER_FIELDS}
    if trainer["precision"] in MEMBER_PRECISIONS:
        trainer["precision"] = "per job"
    key = {
        "model": {k: v for k, v in cfg["model"].items() if k not in ("hook", "hooks", "target_hook", "d_model")},
        "data": cfg["data"],
        "data_order_seed": cfg["data"].get("seed") if cfg["data"].get("seed") is not None else cfg["seed"],
        "steps": run_steps(job.cfg),
        "trainer": trainer,
        "callbacks": own_paths(cfg.get("callbacks")),
        "eval": cfg["eval"],
        "cache_dir": cfg["paths"]["cache_dir"],
        "resume_step": resume_step(job.resume_from),
    }
    return json.dumps(key, sort_keys=True, default=str)


def shared_config(jobs: Sequence[Job]) -> DictConfig:
    """What a group's jobs share, and only that: the sections group_key compares (model, data, trainer,
    callbacks, eval, paths, and the seed that orders the data), from the first job, after checking that every job
    of the group agrees on them. The training loop reads the group's settings here, so the grouping rule
    (group_key) alone decides what is shared."""
    keys = {group_key(job) for job in jobs}
    if len(keys) != 1:
        raise ValueError(f"a group of {len(jobs)} jobs differs in what its jobs must share (see group_key)")
    cfg = jobs[0].cfg
    data = cfg.data
    order_seed = data.get("seed") if data.get("seed") is not None else cfg.seed  # part of the key
    return OmegaConf.create({**{name: cfg[name] for name in SHARED_SECTIONS if name in cfg}, "seed": order_seed})


def resume_step(path: Path | None) -> int | None:
    """The step a job's checkpoint was saved at (jobs resume together only from the same step)."""
    if path is None:
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def sae_bytes(job: Job) -> int:
    """A rough upper estimate of one SAE's training memory: weights, gradients and two Adam moments for up to
    three [d_in, d_sae] matrices (the Gated SAE's), plus six [batch, d_sae] float32 activations."""
    _, sae = sae_config(job.sae_config())  # the variant's own width rule (prepare_job validated it)
    d_in, d_sae, batch = int(sae.d_in), int(sae.width), int(job.cfg.data.batch_size)
    return 4 * (4 * 3 * d_in * d_sae + 6 * batch * d_sae)


def free_bytes(device: str) -> int:
    """Free memory on the device the group trains on (CUDA: the GPU's; otherwise MemAvailable)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: no memory split


def split_by_limits(jobs: Sequence[Job], max_saes: int, budget: int) -> list[list[Job]]:
    """Consecutive runs of jobs, each at most `max_saes` long and (when possible) within `budget` bytes."""
    groups: list[list[Job]] = []
    used = 0
    for job in jobs:
        need = sae_bytes(job)
        if not groups or len(groups[-1]) >= max_saes or (used + need > budget and groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(job)
        used += need
    return groups


def make_groups(jobs: Sequence[Job], max_saes: int, memory_fraction: float) -> list[list[Job]]:
    """The groups a multirun trains, in the order of their first job."""
    if max_saes < 1:
        raise ConfigError("hydra.launcher.max_saes_per_group", max_saes, "a positive integer")
    if not 0 < memory_fraction <= 1:
        raise ConfigError("hydra.launcher.memory_fraction", memory_fraction, "a fraction in (0, 1]")
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(group_key(job), []).append(job)
    groups = []
    for members in by_key.values():
        device = resolve_device(str(members[0].cfg.model.device))
        budget = int(memory_fraction * free_bytes(device))
        by_count = split_by_limits(members, max_saes, 2**62)
        split = split_by_limits(members, max_saes, budget)
        if len(split) > len(by_count):
            need = sum(sae_bytes(j) for j in members) / 2**30
            log.info("fanout: %d SAEs need ~%.1f GiB, more than %.0f%% of the %.1f GiB free on %s; split into %d "
                     "groups", len(members), need, 100 * memory_fraction, free_bytes(device) / 2**30, device,
                     len(split))
        groups += split
    return groups
