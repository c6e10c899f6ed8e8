"""Synthetic defaults that fit their world: on data=synthetic, a variant given no sparsity of its own trains at
the world's mean L0; one given k, target_l0 or a coefficient keeps it."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from saelab.data.sources import build_source
from saelab.run.compose import compose_run_config
from saelab.run.world_sparsity import fit_sparsity_to_world
from tests.conftest import run_cli


class _UnaskedWorld:
    """A source whose mean L0 must not be asked for (a SynthSAEBench world would compute it for nothing)."""

    @property
    def mean_l0(self) -> float:
        raise AssertionError("mean_l0 read although the sparsity was given")


@pytest.mark.parametrize("variant", ["relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"])
def test_a_variant_without_explicit_sparsity_trains_at_the_worlds_mean_l0(variant):
    overrides = ["data=synthetic", f"sae={variant}", "data.synthetic.mean_l0=5"]
    cfg = compose_run_config(overrides)
    source = build_source(cfg.data)
    assert source.mean_l0 == 5
    assert fit_sparsity_to_world(cfg, overrides, source) == 5
    assert cfg.sae.target_l0 == 5


@pytest.mark.parametrize("explicit", ["sae.k=32", "sae.target_l0=12", "sae.sparsity_coefficient=0.3",
                                      "sae.target_l0=null", "+sae.k=4"])
def test_an_explicit_sparsity_is_kept(explicit):
    variant = "topk" if "k=" in explicit else "relu"
    overrides = ["data=synthetic", f"sae={variant}", explicit]
    cfg = compose_run_config(overrides[:2] + ([] if explicit.startswith("+") else [explicit]))
    before = OmegaConf.to_container(cfg.sae)
    assert fit_sparsity_to_world(cfg, overrides, _UnaskedWorld()) is None
    assert OmegaConf.to_container(cfg.sae) == before


def test_a_model_source_has_no_world_to_fit():
    cfg = compose_run_config(["sae=topk"])
    source = build_source(cfg.data)
    assert source.mean_l0 is None
    assert fit_sparsity_to_world(cfg, ["sae=topk"], source) is None and cfg.sae.target_l0 is None


def test_synthsaebench_knows_its_expected_l0():
    """The small preset's expected L0 from its spec (copula aside), which the world's marginals sum to."""
    source = build_source(compose_run_config(["data=synthsaebench_small"]).data)
    assert source.mean_l0 == pytest.approx(16.0, abs=0.1)


@pytest.mark.slow
def test_topk_on_the_synthetic_world_trains_k_at_its_mean_l0(tmp_path):
    """`saelab-train data=synthetic sae=topk` with nothing else: k = 8 (the world's mean L0), not the YAML's 32;
    the run's held-out L0 says so."""
    result = run_cli(["data=synthetic", "sae=topk", "data.train_tokens=51200", "eval.tokens=4096", "logger=none",
                      f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run",
                      "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sae.target_l0 = 8: the synthetic world's mean L0" in result.stderr + result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(8, abs=0.01)
