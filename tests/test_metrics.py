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
