"""saelab installs like a package: the wheel carries its configs, and an installed saelab-train and saelab-eval
run from an empty directory, with a user's own experiment kept in that directory (Hydra's --config-dir).

The wheel is built from this checkout and installed (not editable) into a fresh virtual environment. Its
dependencies are the project environment's, reached through a plain path entry (a `.pth` line, whose own `.pth`
files, the editable install's among them, Python does not process), so this checkout's `src/` is never
importable there: the test fails if a config, a template or a kernel source is missing from the wheel.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

USER_EXPERIMENT = """\
# @package _global_
# A user's own recipe, kept outside saelab: a 2x dictionary with its own tag.
sae:
  expansion_factor: 2
tags: [user_experiment]
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv holding saelab from its wheel."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a copy, so the build's own build/ and egg-info stay out of the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("saelab-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return venv / "bin"


def test_installed_saelab_trains_and_evaluates_from_an_empty_directory(installed, tiny_model_dir, tiny_corpus_dir,
                                                                      tmp_path):
    work = tmp_path / "empty"
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = subprocess.run([str(installed / "python"), "-c", "import saelab; print(saelab.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout  # the wheel's, not src/
    wheel_files = set(zipfile.ZipFile(next(installed.parent.parent.glob("dist/*.whl"))).namelist())
    import saelab

    conf = Path(saelab.__file__).parent / "conf"
    assert {f"saelab/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")} <= wheel_files

    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_corpus_dir, work / "outputs")
                 if not o.startswith(("data.train_tokens", "sae.expansion_factor"))]
    run_dir = work / "run"
    train = subprocess.run([str(installed / "saelab-train"), "--config-dir", "my_conf", "experiment=mine",
                            *overrides, "data.train_tokens=5120", f"hydra.run.dir={run_dir}"],
                           cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    sae_cfg = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert sae_cfg["d_sae"] == 2 * sae_cfg["d_in"]  # the user's experiment, found in their directory
    assert "user_experiment" in (run_dir / ".hydra" / "config.yaml").read_text()

    evaluate = subprocess.run([str(installed / "saelab-eval"), str(run_dir / "sae"), "--config-dir", "my_conf",
                               "experiment=mine", *overrides, "--out", str(work / "eval")],
                              cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["fvu"]) and metrics["fvu"] == pytest.approx(trained["fvu"], rel=1e-3, abs=1e-4)

    unknown = subprocess.run([str(installed / "saelab-train"), "--config-dir", "my_conf", "experiment=theirs",
                              *overrides], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: experiment='theirs' is not allowed: expected one of clt_replacement, crosscoder_diffing, "
        "crosscoder_model_diffing, gated_aux_ablation, jumprelu_bandwidth, "
        "matryoshka_vs_batchtopk, mine, quickstart, synthetic_variants, synthsaebench, variant_pareto"]


def test_a_config_dir_joins_the_search_path_beside_a_given_one(tmp_path):
    """--config-dir and hydra.searchpath=[file://...] both add a user's options, together (the tools compose
    through compose_run_config; saelab-train's command-line check reads both the same way)."""
    from saelab.run.compose import compose_run_config, config_dirs_of

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for directory, name, factor in ((mine, "wide", 32), (theirs, "narrow", 2)):
        (directory / "experiment").mkdir(parents=True)
        (directory / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\nsae:\n  expansion_factor: "
                                                              f"{factor}\n")
    given = f"hydra.searchpath=[file://{theirs}]"
    assert config_dirs_of(["--config-dir", str(mine), given]) == [mine, theirs]
    assert compose_run_config(["experiment=wide", given], config_dirs=[mine]).sae.expansion_factor == 32
    assert compose_run_config(["experiment=narrow", given], config_dirs=[mine]).sae.expansion_factor == 2
