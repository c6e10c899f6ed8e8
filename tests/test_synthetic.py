"""data=synthetic: the generator's statistics, the ground-truth metrics on planted dictionaries, and a short run
that recovers the planted features."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from saelab.data.synthetic import SyntheticSpec, SyntheticWorld
from saelab.errors import ConfigError
from saelab.metrics.ground_truth import ground_truth_metrics
from tests.conftest import run_cli

SPEC = SyntheticSpec()  # the data=synthetic defaults: 512 features in 64 dimensions, mean L0 8


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SPEC)


@pytest.fixture(scope="module")
def sample(world):
    return world.sample(60_000, torch.Generator().manual_seed(5))


def test_firing_rates_follow_the_specified_marginals(world, sample):
    _, firing = sample
    rate = firing.float().mean(0)
    assert firing.sum(1).float().mean().item() == pytest.approx(SPEC.mean_l0, rel=0.03)
    assert world.probability.sum().item() == pytest.approx(SPEC.mean_l0, rel=1e-3)
    frequent = world.probability > 0.01
    assert frequent.sum() > 100
    torch.testing.assert_close(rate[frequent], world.probability[frequent], rtol=0.15, atol=0.002)
    free = world.parent < 0  # Zipf ordering among the features that are not children
    p = world.probability[free]
    assert (p[:-1] >= p[1:] - 1e-7).all() and p[0] > 5 * p[-1]


def test_children_fire_only_with_their_parent(world, sample):
    _, firing = sample
    children = (world.parent >= 0).nonzero().squeeze(1)
    assert len(children) == SPEC.n_parents * SPEC.children_per_parent
    parents = world.parent[children]
    assert not (firing[:, children] & ~firing[:, parents]).any()
    given_parent = firing[:, children].sum(0).float() / firing[:, parents].sum(0).float()
    assert given_parent.mean().item() == pytest.approx(SPEC.child_given_parent, abs=0.02)


def test_samples_are_the_sum_of_firing_features_plus_noise(world, sample):
    x, firing = sample
    # magnitude_mean 1: the residual is sum_i a_i (m_i - 1) d_i + noise, whose energy has no cross terms (m_i - 1
    # has mean 0, independently per feature): E||r||^2 = mean_l0 Var(m) + noise_std^2, Var(m) = mean^2 (e^(s^2) - 1).
    assert SPEC.magnitude_mean == 1.0
    residual = x - (firing.float() @ world.dictionary)
    assert x.shape == (60_000, SPEC.d_in) and torch.allclose(world.dictionary.norm(dim=1), torch.ones(SPEC.n_features))
    clean = SyntheticWorld(dataclasses.replace(SPEC, magnitude_std=0.0, noise_std=0.0)).sample(
        100, torch.Generator().manual_seed(1))
    assert torch.allclose(clean[0], clean[1].float() @ world.dictionary, atol=1e-5)  # same world seed, same d_i
    expected = SPEC.mean_l0 * (math.exp(SPEC.magnitude_std**2) - 1) + SPEC.noise_std**2
    assert residual.pow(2).sum(1).mean().item() == pytest.approx(expected, rel=0.05)


def test_deterministic_by_seed():
    a, b = SyntheticWorld(SPEC), SyntheticWorld(SPEC)
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.probability, b.probability)
    assert torch.equal(next(a.stream(64, 3)), next(b.stream(64, 3)))
    assert not torch.equal(next(a.stream(64, 3)), next(a.stream(64, 4)))  # the data seed orders the samples
    assert torch.equal(a.held_out(100)[0], b.held_out(100)[0])
    other = SyntheticWorld(dataclasses.replace(SPEC, world_seed=1))
    assert not torch.equal(other.dictionary, a.dictionary)


def test_overlap_and_correlation_knobs_do_what_they_say():
    def mean_abs_cos(world):
        cos = world.dictionary @ world.dictionary.T
        return (cos - torch.eye(len(cos))).abs().mean().item()

    crowded = SyntheticWorld(dataclasses.replace(SPEC, overlap=2.0))
    assert mean_abs_cos(crowded) > 1.5 * mean_abs_cos(SyntheticWorld(SPEC))

    def co_firing(spec):  # mean |correlation| between the firing of the 8 most frequent features
        firing = SyntheticWorld(spec).sample(40_000, torch.Generator().manual_seed(0))[1].float()
        corr = torch.corrcoef(firing[:, :8].T)
        return (corr - torch.eye(8)).abs().sum().item() / 56

    assert co_firing(SPEC) < 0.02
    assert co_firing(dataclasses.replace(SPEC, correlation=0.9, correlation_rank=1)) > 0.1


def test_bad_spec_fails_with_the_field_named():
    with pytest.raises(ConfigError, match=r"data.synthetic.n_parents=200 is not allowed"):
        SyntheticSpec.from_config({"synthetic": {"n_parents": 200}})
    with pytest.raises(ConfigError, match=r"data.synthetic.colour='red' is not allowed: expected a field of"):
        SyntheticSpec.from_config({"synthetic": {"colour": "red"}})


def test_matching_scores_a_planted_copy_near_one_and_a_random_dictionary_near_chance(world, sample):
    _, firing = sample
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(SPEC.n_features, generator=g)
    signs = torch.where(torch.rand(SPEC.n_features, generator=g) < 0.5, -1.0, 1.0)
    planted = signs[:, None] * world.dictionary[perm] + 0.02 * torch.randn(SPEC.n_features, SPEC.d_in, generator=g)
    planted_firing = firing[:, perm]  # latent j fires exactly when its feature perm[j] does
    m = ground_truth_metrics(planted, planted_firing, world.dictionary, firing, world.parent)
    assert m["mcc"] > 0.95 and m["recovered_fraction"] > 0.95 and m["uniqueness"] > 0.95
    assert m["firing_precision"] == pytest.approx(1.0) and m["firing_recall"] == pytest.approx(1.0)
    assert m["absorption_rate"] == 0.0

    # Two latents per feature (the planted copy twice): half the live latents are unique.
    doubled = ground_truth_metrics(torch.cat([planted, planted]), torch.cat([planted_firing, planted_firing], 1),
                                   world.dictionary, firing, world.parent)
    assert doubled["uniqueness"] == pytest.approx(0.5)

    random = torch.randn(SPEC.n_features, SPEC.d_in, generator=g)
    chance = ground_truth_metrics(random, planted_firing, world.dictionary, firing, world.parent)
    assert chance["mcc"] < 0.45 and chance["recovered_fraction"] == 0.0

    # Absorption: the parents' latents go silent exactly where a child fires.
    absorbed = planted_firing.clone()
    inverse = torch.argsort(perm)  # latent of feature i
    for p in range(SPEC.n_parents):
        children = (world.parent == p).nonzero().squeeze(1)
        absorbed[:, inverse[p]] &= ~firing[:, children].any(1)
    assert ground_truth_metrics(planted, absorbed, world.dictionary, firing, world.parent)[
        "absorption_rate"] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_short_run_recovers_most_planted_features(tmp_path):
    """TopK at the world's mean L0 on the default 1M samples: most features found (measured: mcc 0.90, 81%
    recovered; a random dictionary scores mcc ~0.3 and recovers none, test above), with the truth saved."""
    result = run_cli(["data=synthetic", "sae=topk", "sae.k=8", "sae.d_sae=512", "optim.lr=3e-3", "logger=none",
                      f"paths.output_dir={tmp_path}",
                      "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = {p.parent for p in tmp_path.rglob("metrics.json")}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mcc"] > 0.8 and metrics["recovered_fraction"] > 0.6, metrics
    assert metrics["firing_f1"] > 0.45 and "absorption_rate" in metrics
    assert (run_dir / "ground_truth.safetensors").is_file()
    cfg = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == SPEC.d_in and cfg["metadata"]["model_name"] == "synthetic"
    assert cfg["metadata"]["has_model"] is False  # saelab-dashboard refuses it (tests/test_export_metadata.py)


def test_batchtopk_is_also_scored_by_its_batch_topk_when_asked(tmp_path):
    """eval.batch_topk=true: BatchTopK's held-out metrics by its training selection too (SynthSAEBench's way),
    named batch_topk_<metric> beside the learned threshold's. Each eval batch keeps exactly B k entries, so that
    L0 is k (here 8) whatever the threshold's L0 is."""
    result = run_cli(["data=synthetic", "sae=batchtopk", "sae.k=8", "sae.d_sae=256", "optim.lr=3e-3", "logger=none",
                      "data.train_tokens=102400", "eval.tokens=8192", "eval.batch_size=1024", "eval.batch_topk=true",
                      f"paths.output_dir={tmp_path}", "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["batch_topk_l0"] == pytest.approx(8.0, abs=0.01)
    for name in ("fvu", "mcc", "synthsaebench_f1", "firing_f1"):
        assert metrics[f"batch_topk_{name}"] >= 0 and name in metrics
    assert metrics["l0"] != metrics["batch_topk_l0"]  # the threshold's own count
