"""data=synthsaebench: the SynthSAEBench world against its spec's expected L0, against SAELens's own world and
samples (a fixture SAELens built, saved and sampled: scripts/saelens_compat/make_synthsaebench_fixture.py), its
on-disk format, determinism, config errors, and a run through the CLI on the SAELens-saved world.

Statistical checks are z-scores from the estimators' standard errors (binomial for rates, normal for means, the
sample fourth moment for variances), with fixed seeds, so each test is deterministic."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.data.sources.synthsaebench import SynthSAEBenchSource
from saelab.data.synthsaebench import SynthSAEBenchSpec, build_world, load_world, save_world
from saelab.data.synthsaebench.directions import orthogonality_gradient
from saelab.data.synthsaebench.world import saelens_config
from saelab.errors import ConfigError
from saelab.metrics.ground_truth import ground_truth_metrics
from saelab.run.compose import CONF_DIR
from tests.conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "synthsaebench_small"
# The spec of the fixture world (the script's SyntheticModelConfig, in saelab's knobs).
FIXTURE_SPEC = SynthSAEBenchSpec(n_features=1024, d_in=32, hierarchy_roots=8, copula_rank=8, copula_std=0.25,
                                 world_seed=7)
SMALL = SynthSAEBenchSpec(n_features=1024, d_in=32, hierarchy_roots=8, copula_rank=0, orthogonalize_steps=0)
Z = 5.0  # the largest |z| allowed over a family of ~1000 statistics (P(|z| > 5) = 6e-7 each)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many small tensor operations: on the shared 2-core machine a second thread only contends."""


@pytest.fixture(scope="module")
def saelens_stats() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "saelens_stats.safetensors"))


@pytest.fixture(scope="module")
def saelab_acts() -> torch.Tensor:
    """saelab's sampler on the SAELens-saved world: as many samples as SAELens drew, in chunks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = load_world(FIXTURE)
        g = torch.Generator().manual_seed(2024)
        return torch.cat([world.sample_activations(10_000, g) for _ in range(10)])
    finally:
        torch.set_num_threads(threads)


def two_sample_rate_z(count_a: torch.Tensor, n_a: int, count_b: torch.Tensor, n_b: int) -> torch.Tensor:
    """z of the difference of two binomial proportions (pooled standard error); 0 where neither ever fired."""
    pa, pb = count_a.double() / n_a, count_b.double() / n_b
    pooled = (count_a.double() + count_b.double()) / (n_a + n_b)
    se = torch.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return torch.where(se > 0, (pa - pb) / se.clamp_min(1e-300), torch.zeros_like(se))


def moments(power: list[torch.Tensor], count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, variance, variance of the sample variance) per feature from sums of a^1..a^4 over `count` firings:
    Var(s^2) ~ (mu4 - sigma^4) / count."""
    c = count.double()
    m1, m2, m3, m4 = (p / c for p in power)
    var = m2 - m1**2
    mu4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
    return m1, var, (mu4 - var**2) / c


# --- the spec's expected L0 -----------------------------------------------------------------------------------


def test_the_default_is_the_papers_16k_world_with_expected_l0_34():
    """The 16k world's L0 from its spec (expectation.py: probabilities, gating, exclusion): ~34 over all
    features, ~25 over features 0-4095, as the paper says; a sample agrees (directions do not matter here, so
    the 100 Adam steps are skipped)."""
    spec = SynthSAEBenchSpec(orthogonalize_steps=0)
    assert (spec.n_features, spec.d_in, spec.hierarchy_size) == (16_384, 768, 128 * 85)
    world = build_world(spec)
    assert world.expected_l0() == pytest.approx(34.49, abs=0.01)
    assert world.expected_l0(4096) == pytest.approx(25.17, abs=0.01)
    firing = world.sample(1024, torch.Generator().manual_seed(0))[1]
    l0 = firing.sum(1).double()
    assert abs(l0.mean() - world.expected_l0()) < 4 * l0.std() / math.sqrt(len(l0))
    head = firing[:, :4096].sum(1).double()
    assert abs(head.mean() - world.expected_l0(4096)) < 4 * head.std() / math.sqrt(len(head))


def test_expected_firing_matches_the_sampler_without_a_copula():
    """Without the copula the expectation is exact: the sampled L0 and every feature's rate agree with it within
    sampling error, the hierarchy and the exclusion included (children of the compensated tree fire near their
    base probability, not at q)."""
    world = build_world(SMALL)
    n = 100_000
    firing = torch.cat([world.sample(10_000, torch.Generator().manual_seed(i))[1] for i in range(n // 10_000)])
    l0 = firing.sum(1).double()
    assert abs(l0.mean() - world.expected_l0()) / (l0.std() / math.sqrt(n)) < 4
    p = world.probability.double()
    z = (firing.double().mean(0) - p) / torch.sqrt(p * (1 - p) / n)
    assert z.abs().max() < Z and (z**2).mean() == pytest.approx(1.0, abs=0.2)
    in_tree = world.parent >= 0
    assert (world.sampling_probability[in_tree] > world.probability[in_tree] * 1.5).float().mean() > 0.9


# --- SAELens's world and samples ------------------------------------------------------------------------------


def test_the_builder_draws_saelens_world_for_the_same_config_and_seed():
    """Same probabilities, copula, bias and hierarchy to the bit, the same config file; directions equal up to
    the rounding of the orthogonalisation (closed-form gradient here, chunked autograd there)."""
    built, saved = build_world(FIXTURE_SPEC), load_world(FIXTURE)
    assert built.config == json.loads((FIXTURE / "synthetic_model_config.json").read_text())
    assert built.hierarchy.roots == json.loads((FIXTURE / "hierarchy.json").read_text())["roots"]
    assert torch.equal(built.sampling_probability, saved.sampling_probability)
    assert torch.equal(built.copula.factor, saved.copula.factor) and torch.equal(built.copula.diag, saved.copula.diag)
    assert torch.equal(built.bias, saved.bias) and built.bias.norm().item() == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(built.dictionary, saved.dictionary, atol=1e-5, rtol=0)
    assert torch.equal(built.parent, saved.parent) and torch.equal(built.mean_magnitude, saved.mean_magnitude)
    assert torch.equal(built.std_magnitude, saved.std_magnitude)


def test_the_orthogonality_gradient_is_the_losss():
    """directions.py's closed form against autograd on L = sum_{i != j} (d_i.d_j)^2 + N sum_i (|d_i|^2 - 1)^2."""
    rows = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    gram = rows @ rows.T
    off = gram - torch.diag(torch.diag(gram))
    loss = (off**2).sum() + len(rows) * ((torch.diag(gram) - 1) ** 2).sum()
    loss.backward()
    torch.testing.assert_close(orthogonality_gradient(rows.detach()), rows.grad)


def test_sampler_matches_saelens_sampled_statistics(saelens_stats, saelab_acts):
    """On the world SAELens saved, saelab's samples against SAELens's (100k each): per-feature firing rates,
    co-firing of correlated, parent-child, grandparent-grandchild and random pairs, the L0's mean, the
    magnitudes' mean and variance per feature, and the mean of x, all within sampling error."""
    stats, acts = saelens_stats, saelab_acts
    n = int(stats["samples"])
    assert len(acts) == n
    fired = acts > 0
    rate_z = two_sample_rate_z(fired.sum(0), n, stats["fire_count"], n)
    assert rate_z.abs().max() < Z and (rate_z**2).mean() == pytest.approx(1.0, abs=0.3)

    pairs = stats["pairs"]
    both = (fired[:, pairs[:, 0]] & fired[:, pairs[:, 1]]).sum(0)
    assert two_sample_rate_z(both, n, stats["pair_count"], n).abs().max() < Z
    # The pairs have power: SAELens's co-firing of the most correlated pairs is not independence's.
    rates = stats["fire_count"].double() / n
    independent = rates[pairs[:60, 0]] * rates[pairs[:60, 1]]
    observed = stats["pair_count"][:60].double() / n
    assert ((observed - independent).abs() / torch.sqrt(independent / n) > Z).sum() >= 10

    l0 = fired.sum(1).double()
    their_mean = stats["l0_sum"].double() / n
    their_var = stats["l0_sq_sum"].double() / n - their_mean**2
    assert abs(l0.mean() - their_mean) / torch.sqrt(l0.var() / n + their_var / n) < 4

    ours = [(acts.double() ** k).sum(0) for k in range(1, 5)]
    theirs = [stats[f"act_power_{k}"] for k in range(1, 5)]
    mean_a, var_a, var_var_a = moments(ours, fired.sum(0))
    mean_b, var_b, var_var_b = moments(theirs, stats["fire_count"])
    enough = (fired.sum(0) >= 100) & (stats["fire_count"] >= 100)
    assert enough.sum() > 500
    mean_z = (mean_a - mean_b) / torch.sqrt(var_a / fired.sum(0) + var_b / stats["fire_count"])
    var_z = (var_a - var_b) / torch.sqrt(var_var_a + var_var_b)
    assert mean_z[enough].abs().max() < Z and var_z[enough].abs().max() < Z

    world = load_world(FIXTURE)
    x = acts @ world.dictionary + world.bias
    their_x = stats["x_sum"] / n
    their_x_var = stats["x_sq_sum"] / n - their_x**2
    x_z = (x.double().mean(0) - their_x) / torch.sqrt(x.double().var(0) / n + their_x_var / n)
    assert x_z.abs().max() < 4


def test_siblings_never_cofire_and_children_never_fire_without_parents(saelens_stats, saelab_acts):
    world = load_world(FIXTURE)
    fired = saelab_acts > 0
    assert int(saelens_stats["sibling_conflicts"]) == 0 and int(saelens_stats["gating_violations"]) == 0
    groups = world.hierarchy.groups
    assert groups.shape == (8 * (1 + 4 + 16), 4)  # every node above the leaves: 4 exclusive children
    assert (fired[:, groups].sum(2) <= 1).all()
    child = world.parent >= 0
    assert not (fired[:, child] & ~fired[:, world.parent[child]]).any()
    # A child's magnitude carries its parent's: it is scaled by a_parent / mean_parent.
    leaves = (world.hierarchy.level == 3).nonzero().squeeze(1)
    parent_of = world.parent[leaves]
    both = fired[:, leaves] & fired[:, parent_of]
    child_a, parent_a = saelab_acts[:, leaves][both], saelab_acts[:, parent_of][both]
    assert torch.corrcoef(torch.stack([child_a, parent_a]))[0, 1] > 0.3


# --- the format, determinism, config --------------------------------------------------------------------------


def test_saelens_format_round_trip(tmp_path):
    """save_world writes what SAELens writes (the fixture's own files back, tensor for tensor), and a built world
    survives save and load."""
    saved = load_world(FIXTURE)
    save_world(saved, tmp_path / "again")
    for name in ("synthetic_model_config.json", "hierarchy.json"):
        assert json.loads((tmp_path / "again" / name).read_text()) == json.loads((FIXTURE / name).read_text())
    theirs, ours = (load_file(str(d / "synthetic_model.safetensors")) for d in (FIXTURE, tmp_path / "again"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)

    built = build_world(SynthSAEBenchSpec(n_features=300, d_in=16, hierarchy_roots=3, copula_rank=4,
                                          orthogonalize_steps=5, world_seed=3))
    save_world(built, tmp_path / "built")
    loaded = load_world(tmp_path / "built")
    for name in ("dictionary", "bias", "sampling_probability", "probability", "parent", "mean_magnitude",
                 "std_magnitude"):
        assert torch.equal(getattr(built, name), getattr(loaded, name)), name
    assert torch.equal(built.copula.factor, loaded.copula.factor)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(built.sample(64, g1)[0], loaded.sample(64, g2)[0])


def test_deterministic_by_seed():
    spec = SynthSAEBenchSpec(n_features=256, d_in=16, hierarchy_roots=2, copula_rank=4, orthogonalize_steps=3)
    a, b = build_world(spec), build_world(spec)
    other = build_world(dataclasses.replace(spec, world_seed=43))
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.copula.factor, b.copula.factor)
    assert not torch.equal(a.dictionary, other.dictionary)
    assert torch.equal(a.held_out(100)[0], b.held_out(100)[0])
    assert torch.equal(next(a.stream(32, seed=5)), next(b.stream(32, seed=5)))
    assert not torch.equal(next(a.stream(32, seed=5)), next(a.stream(32, seed=6)))
    x, firing = a.sample(5000, torch.Generator().manual_seed(0))  # chunked (CHUNK) like the held-out set
    assert x.shape == (5000, 16) and firing.shape == (5000, 256) and firing.dtype == torch.bool


@pytest.mark.parametrize(("field", "value"), [
    ("n_features", 0), ("d_in", 1.5), ("hierarchy_branching", 1), ("hierarchy_roots", -1), ("max_probability", 1.5),
    ("min_probability", 0.5), ("zipf_exponent", 0), ("copula_std", -0.1), ("orthogonalize_steps", 2.0),
    ("world_seed", "x"), ("magnitude_std_std", 0), ("colour", 1),
])
def test_a_bad_field_is_refused_in_one_line_naming_it(field, value):
    with pytest.raises(ConfigError, match=rf"^data\.synthsaebench\.{field}="):
        SynthSAEBenchSpec.from_config({"synthsaebench": {field: value}})


def test_a_missing_world_directory_is_refused_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.synthsaebench\.path="):
        SynthSAEBenchSource({"source": "synthsaebench", "synthsaebench": {"path": str(tmp_path)}})
    source = SynthSAEBenchSource({"source": "synthsaebench", "synthsaebench": {"path": str(FIXTURE)}})
    assert source.d_in == 32 and source.world_seed == 7 and source.key_inputs()["config"]["num_features"] == 1024


# --- the ground-truth metrics and the CLI ---------------------------------------------------------------------


def test_ground_truth_metrics_work_on_the_world():
    """The truth itself scores mcc 1 and perfect firing; the saved tensors are SyntheticWorld's (and the bias)."""
    world = load_world(FIXTURE)
    x, firing = world.held_out(4096)
    metrics = ground_truth_metrics(world.dictionary, firing, world.dictionary, firing, world.parent)
    assert metrics["mcc"] == pytest.approx(1.0)
    # Every latent detects its own feature perfectly, but a feature silent on the held-out set scores 0.
    seen = firing.any(0).float().mean().item()
    assert metrics["synthsaebench_f1"] == pytest.approx(seen, abs=1e-6) and seen < 1
    assert metrics["absorption_rate"] == 0.0
    assert set(world.tensors()) == {"dictionary", "probability", "parent", "bias"}
    assert world.tensors()["dictionary"].shape == (1024, 32) and x.shape == (4096, 32)


@pytest.mark.slow
def test_a_run_on_the_saelens_saved_world(tmp_path):
    """`data=synthsaebench` with `data.synthsaebench.path`: trains, writes the ground truth and its metrics."""
    result = run_cli(["data=synthsaebench_small", f"data.synthsaebench.path={FIXTURE}", "data.synthsaebench.d_in=32",
                      "sae=topk", "sae.k=8", "sae.d_sae=256", "data.train_tokens=10240", "data.normalize_tokens=4096",
                      "eval.tokens=4096", "eval.batch_size=1024", "logger=csv", f"paths.output_dir={tmp_path}",
                      "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    for name in ("mcc", "synthsaebench_f1", "firing_f1", "absorption_rate", "fvu"):
        assert name in metrics, name
    truth = load_file(str(metrics_file.parent / "ground_truth.safetensors"))
    assert torch.equal(truth["dictionary"], load_world(FIXTURE).dictionary)


def test_the_configs_spec_is_the_default_spec():
    """conf/data/synthsaebench.yaml states the defaults (no drift between YAML and dataclass); the small preset
    only shrinks the sizes."""
    from omegaconf import OmegaConf

    conf = CONF_DIR / "data"
    full = OmegaConf.to_container(OmegaConf.load(conf / "synthsaebench.yaml"))["synthsaebench"]
    assert SynthSAEBenchSpec.from_config({"synthsaebench": full}) == SynthSAEBenchSpec()
    assert saelens_config(SynthSAEBenchSpec())["seed"] == 42
    small = OmegaConf.to_container(OmegaConf.load(conf / "synthsaebench_small.yaml"))["synthsaebench"]
    assert set(small) == {"n_features", "d_in", "hierarchy_roots"}
