"""Reconstruction metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from saelab.metrics.reconstruction import ReconstructionMetrics


def test_fvu_accumulates_numerator_and_denominator_separately_over_uneven_batches():
    torch.manual_seed(0)
    x = torch.randn(103, 5) * torch.tensor([1.0, 2, 3, 4, 5]) + 7.0  # large mean: variance is about the mean
    noise = torch.where(torch.arange(103) < 50, 1.5, 0.1).unsqueeze(1)  # batches differ in quality
    x_hat = x + noise * torch.randn_like(x)
    f = torch.relu(torch.randn(103, 8))
    metrics = ReconstructionMetrics(8)
    for lo, hi in [(0, 3), (3, 50), (50, 103)]:  # batches of 3, 47 and 53 tokens
        metrics.update(x[lo:hi], x_hat[lo:hi], f[lo:hi])
    out = metrics.compute()
    x64, xh64 = x.double(), x_hat.double()
    expected_fvu = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert out["fvu"] == pytest.approx(expected_fvu.item(), rel=1e-9)
    assert out["explained_variance"] == pytest.approx(1 - expected_fvu.item(), rel=1e-9)
    # a mean of per-batch ratios would differ noticeably here
    per_batch = [(((x64[a:b] - xh64[a:b]) ** 2).sum() / ((x64[a:b] - x64[a:b].mean(0)) ** 2).sum()).item()
                 for a, b in [(0, 3), (3, 50), (50, 103)]]
    assert abs(sum(per_batch) / 3 - out["fvu"]) > 0.05
    assert out["l0"] == pytest.approx((f > 0).sum(-1).double().mean().item())
    assert out["shrinkage"] == pytest.approx(((xh64**2).sum() / (x64 * xh64).sum()).item(), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(x64, xh64, dim=-1).mean().item()
    assert out["cosine"] == pytest.approx(cos, rel=1e-9)


def test_dead_and_dense_fractions_and_density_histogram():
    f = torch.zeros(100, 4)
    f[:, 0] = 1.0  # fires on every token: dense
    f[:5, 1] = 1.0  # 5%: neither dead nor dense
    f[:20, 2] = 1.0  # 20%: dense
    metrics = ReconstructionMetrics(4)
    x = torch.randn(100, 3)
    metrics.update(x, x, f)
    out = metrics.compute()
    assert out["dead_fraction"] == 0.25 and out["dense_fraction"] == 0.5
    density = metrics.log10_density()
    assert density[0] == 0 and density[1] == pytest.approx(torch.log10(torch.tensor(0.05)).item())
    assert density[3] == float("-inf")


def test_shrinkage_below_one_when_reconstructions_are_shrunk():
    x = torch.randn(50, 6)
    metrics = ReconstructionMetrics(2)
    metrics.update(x, 0.8 * x, torch.ones(50, 2))
    assert metrics.compute()["shrinkage"] == pytest.approx(0.8)


def test_synthsaebench_conventions_beside_saelabs_from_their_definitions():
    """SynthSAEBench's F1 and uniqueness (every latent with its nearest true feature by |cos|, dead latents 0,
    averaged over all latents), worked by hand on 4 latents and 3 features, named apart from saelab's."""
    from saelab.metrics.ground_truth import ground_truth_metrics

    truth = torch.eye(3)
    decoder = torch.tensor([[1.0, 0, 0], [0.1, 0.9, 0], [0, -1.0, 0], [0, 0, 1.0]])  # nearest: 0, 1, 1 (sign), 2
    truth_fired = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]).T.bool()
    latents_fired = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0],
                                  [0, 0, 0, 0, 0, 0]]).T.bool()  # latent 3 is dead
    metrics = ground_truth_metrics(decoder, latents_fired, truth, truth_fired, torch.full((3,), -1))
    # per latent (tp, fp, fn): (1, 1, 1), (2, 0, 0), (1, 0, 1), (0, 0, 2)
    precision, recall = [0.5, 1.0, 1.0, 0.0], [0.5, 1.0, 0.5, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    assert metrics["synthsaebench_precision"] == pytest.approx(sum(precision) / 4)
    assert metrics["synthsaebench_recall"] == pytest.approx(sum(recall) / 4)
    assert metrics["synthsaebench_f1"] == pytest.approx(sum(f1) / 4)  # 0.5417
    assert metrics["synthsaebench_uniqueness"] == pytest.approx(3 / 4)  # {0, 1, 2} over all 4 latents
    assert metrics["uniqueness"] == pytest.approx(2 / 3)  # saelab's: the 3 latents that fire, {0, 1}
