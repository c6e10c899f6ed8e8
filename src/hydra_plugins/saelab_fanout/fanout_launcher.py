"""`hydra/launcher=fanout`: a Hydra launcher that trains the jobs of a multirun in groups, one process per
group, each group sharing one activation stream (saelab.run.grouping groups them, saelab.run.training trains them).

Every job is first set up as Hydra sets up any job (its directory, `.hydra/` files, log file and resolved
config, through Hydra's own `run_job`); then each group trains in lockstep and every job gets its results,
or its own `error.txt`, in its own directory. The class must live in the `hydra_plugins` package for Hydra to
load it; the work is in saelab.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class FanoutLauncher(Launcher):
    def __init__(self, max_saes_per_group: int = 32, memory_fraction: float = 0.8) -> None:
        super().__init__()
        self.max_saes_per_group, self.memory_fraction = int(max_saes_per_group), float(memory_fraction)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # saelab's training path replaces the task function: each job is prepared, then trained in its group.
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import torch

        from saelab.cli.train import sweep_objective
        from saelab.run.grouping import make_groups
        from saelab.run.job import report_failure
        from saelab.run.loggers import finish_wandb
        from saelab.run.training import train_group

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, grouped by activation stream")
        returns, jobs = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            ret = run_job(hydra_context=self.hydra_context, task_function=_prepare, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            returns.append(ret)
            if ret.return_value is not None:
                jobs.append((ret, ret.return_value))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        failed = len(returns) - len(jobs)  # refused while being set up
        for ret, job in jobs:  # a resumed sweep's finished jobs keep their results (prepare_job found them)
            if job.finished is not None:
                ret.return_value = sweep_objective(job.finished, job.cfg)
        to_train = [job for _, job in jobs if job.finished is None]
        try:
            groups = make_groups(to_train, self.max_saes_per_group, self.memory_fraction) if to_train else []
        except Exception as err:
            for job in to_train:
                report_failure(job.run_dir, err)
            failed, groups = failed + len(to_train), []
        by_job = {id(job): ret for ret, job in jobs}
        for number, group in enumerate(groups):
            log.info(f"group {number + 1}/{len(groups)}: jobs {', '.join(f'#{j.num}' for j in group)} share one "
                     "activation stream")
            for job, outcome in zip(group, train_group(group), strict=True):
                ret = by_job[id(job)]
                if isinstance(outcome, BaseException):
                    report_failure(job.run_dir, outcome)
                    ret.return_value = None
                    failed += 1
                else:
                    ret.return_value = sweep_objective(outcome, job.cfg) if "global_rank" not in outcome else None
            finish_wandb()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for ret, job in jobs:  # jobs no group trained (the grouping failed) return None, as failed jobs do
            if ret.return_value is job:
                ret.return_value = None
        if returns and failed == len(returns):  # one job failing leaves the sweep going; all of them is an error
            raise SystemExit(f"error: all {len(returns)} jobs of this multirun failed; each one's error is in "
                             f"{self.config.hydra.sweep.dir}/<job>/error.txt")
        return returns


def _prepare(cfg: DictConfig):
    """The task function run inside each job's Hydra context: its Job, or None after recording its error."""
    from saelab.errors import ConfigError
    from saelab.run.job import prepare_job, report_failure
    from saelab.run.training import world_size

    try:
        job = prepare_job(cfg)
        if world_size(job.cfg) > 1:
            raise ConfigError("trainer.devices", job.cfg.trainer.get("devices"),
                              "one device with hydra/launcher=fanout (use the basic or submitit launcher for DDP)")
        return job
    except Exception as err:  # the job fails alone; the sweep goes on
        report_failure(Path(HydraConfig.get().runtime.output_dir), err)
        return None
