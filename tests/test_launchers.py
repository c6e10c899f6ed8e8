"""Hydra launcher and sweeper plugins with saelab's config: submitit (local and SLURM) and Optuna.

The runs use the tiny model through the real CLI in a subprocess. SLURM is not installed: the SLURM tests
stop at composition (`--cfg hydra`) or at `sbatch`, replaced by a stand-in that records the script it gets.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from saelab.cli.train import sweep_objective
from saelab.run.compose import CONF_DIR
from tests.conftest import REPO, run_cli, tiny_overrides

FAST = ["data.train_tokens=2560"]


def _sweep_dir(out: Path) -> Path:
    (sweep_dir,) = (out / "multirun").glob("*/*")
    return sweep_dir


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.rglob("metrics.json"))


def _overrides(job_dir: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in json.loads((job_dir / "metrics.json").read_text())["overrides"])


# -- submitit -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_directory(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                      *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), *FAST,
                      "sae.sparsity_coefficient=0.001,0.1"])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = _sweep_dir(out)
    jobs = _job_dirs(sweep_dir)
    assert [j.relative_to(sweep_dir).as_posix() for j in jobs] == ["0", "1"]
    assert {_overrides(j)["sae.sparsity_coefficient"] for j in jobs} == {"0.001", "0.1"}
    # Each job ran as its own submitit process: its logs are in hydra.launcher.submitit_folder, which is
    # ${hydra.sweep.dir}/.submitit/%j, so they stay inside the sweep directory.
    launcher = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert OmegaConf.to_container(launcher)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and len({log.parent for log in logs}) == 2, logs
    assert all("Job completed successfully" in log.read_text() for log in logs)
    assert list(out.rglob(".submitit")) == [sweep_dir / ".submitit"]


def test_submitit_slurm_composes_with_saelab_config():
    """The plugin's own `submitit_slurm` option passes saelab's command-line checks and composes as defined."""
    result = run_cli(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu"
    # saelab's slurm.yaml does not change the plugin's own defaults.
    assert launcher["timeout_min"] == 60 and launcher["array_parallelism"] == 256 and launcher["gpus_per_node"] is None


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """`srun` (submitit looks for it) and an `sbatch` that records the script it is given, then fails."""
    bin_dir, record = tmp_path / "fake-slurm-bin", tmp_path / "sbatch-script.sh"
    bin_dir.mkdir()
    scripts = {"srun": 'echo "srun: test stand-in" >&2; exit 1',
               "sbatch": f'cp "$1" {record}; echo "sbatch: error: test stand-in, nothing submitted" >&2; exit 1'}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, record


@pytest.mark.slow
def test_slurm_launcher_builds_the_sbatch_array_it_would_submit(tiny_model_dir, tiny_corpus_dir, tmp_path):
    env, record = _fake_slurm(tmp_path)
    out = tmp_path / "outputs"
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), "sae.sparsity_coefficient=0.001,0.1"]
    result = subprocess.run([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0 and "test stand-in, nothing submitted" in result.stderr, result.stderr[-3000:]
    script = record.read_text()
    sweep_dir = _sweep_dir(out)
    # conf/hydra/launcher/slurm.yaml's defaults, the partition from the command line, one array task per job.
    for line in ("#SBATCH --partition=gpu", "#SBATCH --array=0-1%2", "#SBATCH --time=120", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --ntasks-per-node=1",
                 f"#SBATCH --output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out"):
        assert line in script.splitlines(), (line, script)
    assert f"{sys.executable} -u -m submitit.core._submit {sweep_dir}/.submitit/%j" in script
    assert not list(out.rglob("metrics.json"))  # nothing ran locally


# -- Optuna -------------------------------------------------------------------------------------------------------

SEARCH_SPACES = {
    "optuna": {"sae.sparsity_coefficient", "optim.lr"},
    "optuna_jumprelu": {"sae.sparsity_coefficient", "optim.lr", "sae.bandwidth"},
    "optuna_topk": {"sae.k", "optim.lr"},
}


@pytest.mark.parametrize("option", sorted(SEARCH_SPACES))
def test_optuna_search_spaces_are_fields_of_the_chosen_variant(option):
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.optimized_metric == "fvu"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(distributions) == SEARCH_SPACES[option] and not fixed
    for key, dist in distributions.items():
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a field of sae={cfg.hydra.runtime.choices.sae}"
        assert type(dist).__name__.endswith("LogUniformDistribution"), (key, dist)
        assert dist.low <= OmegaConf.select(cfg, key) <= dist.high, (key, dist)  # the default is in the range


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_penalised_objective(tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    # An L0 band the tiny runs land above, so the objective is FVU plus the L0 penalty.
    result = run_cli(["hparams_search=optuna_jumprelu", "hydra.sweeper.n_trials=2",
                      *tiny_overrides(tiny_model_dir, tiny_corpus_dir, out), *FAST, "l0_target=[1,2]"])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = _sweep_dir(out)
    jobs = _job_dirs(sweep_dir)
    assert [j.name for j in jobs] == ["0", "1"]
    space = SEARCH_SPACES["optuna_jumprelu"]
    sampled = [{k: float(v) for k, v in _overrides(j).items() if k in space} for j in jobs]
    assert all(set(s) == space for s in sampled) and sampled[0] != sampled[1], sampled
    assert all(1e-4 <= s["optim.lr"] <= 3e-3 and 1e-4 <= s["sae.bandwidth"] <= 0.1 for s in sampled), sampled

    objectives = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["variant"] == "JumpReLUSAE" and metrics["l0"] > 2, metrics
        objective = sweep_objective(metrics, OmegaConf.load(job / ".hydra" / "config.yaml"))
        assert objective == pytest.approx(metrics["fvu"] + 0.01 * (metrics["l0"] - 2), rel=1e-12)
        objectives.append(objective)

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == space
    (best,) = [i for i, s in enumerate(sampled) if s == results["best_params"]]
    assert results["best_value"] == pytest.approx(objectives[best], rel=1e-12)
    assert results["best_value"] == pytest.approx(min(objectives), rel=1e-12)
