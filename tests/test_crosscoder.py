"""Crosscoders on the sites contract (saelab.sites): the contract, the multi-site world, the crosscoder penalty,
the export's per-site scales, the diffing metrics against Minder et al.'s definitions, and whole runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from saelab.data.synthetic import SyntheticSpec, SyntheticWorld
from saelab.data.synthetic_sites import EXCLUSIVE, RATIO, SHARED, MultiSiteWorld
from saelab.errors import ConfigError
from saelab.metrics.evaluate import evaluate_sae
from saelab.metrics.sites import SiteMetrics, auroc, diff_sides, relative_norm
from saelab.saes.base import build_sae
from saelab.saes.saelens_format import ExportedSAE, load_exported
from saelab.sites import Sites
from tests.conftest import assert_one_line_refusal, run_cli, run_module, tiny_overrides
from tests.test_dashboard import build, read_latent

CROSSCODER_L1 = {"_target_": "saelab.saes.relu.ReluSAE", "d_in": 8, "d_sae": 16, "sites": 3, "sparsity": "ri_l1",
                 "decoder_constraint": "none"}


def test_sites_put_the_read_sites_side_by_side_and_refuse_a_repeated_one():
    batch = {"a": torch.ones(2, 3), "b": 2 * torch.ones(2, 3), "c": 3 * torch.ones(2, 3)}
    crosscoder = Sites.of(["a", "b"])
    assert crosscoder.crosscoder and crosscoder.target(batch) is None
    assert torch.equal(crosscoder.input(batch), torch.tensor([[1.0] * 3 + [2.0] * 3] * 2))
    transcoder = Sites.of("a", "c")
    assert transcoder.target_hook == "c" and torch.equal(transcoder.target(batch), batch["c"])
    assert Sites.of("a").hooks == ["a"] and not Sites.of("a").crosscoder
    with pytest.raises(ConfigError, match="model.hook"):
        Sites.of(["a", "b", "a"]).check()


def test_the_multi_site_world_writes_each_feature_at_its_strength_at_each_site():
    spec = SyntheticSpec(d_in=16, n_features=60, mean_l0=4, n_parents=0, sites=2, exclusive_fraction=0.2,
                         ratio_fraction=0.3, weak_strength=0.25, noise_std=0.0)
    world = MultiSiteWorld(spec)
    counts = {k: int((world.kind == k).sum()) for k in (SHARED, EXCLUSIVE, RATIO)}
    assert counts == {SHARED: 30, EXCLUSIVE: 12, RATIO: 18}
    codes, _ = world.codes(200, torch.Generator().manual_seed(1))
    x = world.mix(codes, torch.Generator().manual_seed(2))
    base = SyntheticSpec(**{**spec.__dict__, "sites": 1})
    directions = SyntheticWorld(base).dictionary  # site_direction_overlap 1: the same direction at both sites
    for s in range(2):
        strength = torch.ones(60)
        strength[(world.kind == EXCLUSIVE) & (world.site != s)] = 0.0
        strength[(world.kind == RATIO) & (world.site == s)] = 0.25
        expected = (codes * strength) @ directions
        assert torch.allclose(x[:, 16 * s:16 * (s + 1)], expected, atol=1e-5)


def test_the_crosscoder_penalty_weights_each_latent_by_its_summed_site_decoder_norms():
    torch.manual_seed(0)
    sae = build_sae(CROSSCODER_L1)
    assert sae.d_in == 24 and sae.W_dec.shape == (16, 24)
    x = torch.randn(5, 24)
    step = sae.training_loss(x, {"sparsity": 1.0})
    f = sae.encode(x)
    weights = sum(sae.W_dec[:, 8 * s:8 * (s + 1)].norm(dim=1) for s in range(3))  # Lindsey et al.: sum_s ||d_i^s||
    assert torch.allclose(step.terms["sparsity"], (f * weights).sum(1).mean(), rtol=1e-5)


def test_the_export_folds_each_sites_scale_in():
    torch.manual_seed(0)
    sae = build_sae({**CROSSCODER_L1, "sites": 2, "d_in": 4, "d_sae": 6})
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    scales = [2.0, 5.0]
    exported = ExportedSAE({"architecture": "standard", "apply_b_dec_to_input": True},
                           sae.exported_tensors(scales[0], None, scales))
    x = torch.randn(7, 8)
    raw = torch.cat([x[:, :4] * scales[0], x[:, 4:] * scales[1]], dim=1)
    with torch.no_grad():
        assert torch.allclose(exported.encode(raw), sae.encode(x) * scales[0], atol=1e-5)
        out = sae(x)
        assert torch.allclose(exported(raw), torch.cat([out[:, :4] * scales[0], out[:, 4:] * scales[1]], 1),
                              atol=1e-5)
    # init_from: the export read back into a fresh crosscoder on the same scales is the same crosscoder
    fresh = build_sae({**CROSSCODER_L1, "sites": 2, "d_in": 4, "d_sae": 6})
    fresh.import_tensors(sae.exported_tensors(scales[0], None, scales), scales[0], None, scales)
    for name, value in sae.named_parameters():
        torch.testing.assert_close(dict(fresh.named_parameters())[name], value, rtol=1e-6, atol=1e-6)


def test_relative_norm_and_auroc_follow_their_definitions():
    norms = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 1.0]])
    # Minder et al.: ((||d^B|| - ||d^A||) / max + 1) / 2
    assert relative_norm(norms).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.25])
    # two models at two layers: each side's decoders concatenated, ||(3, 4)|| = 5 against ||(0, 5)|| = 5
    sites = ["blocks.2", "blocks.3", "diff/blocks.2", "diff/blocks.3"]
    assert diff_sides(sites) == ([0, 1], [2, 3]) and diff_sides(["a", "b", "c"]) == ([0], [2])
    assert relative_norm(torch.tensor([[3.0, 4.0, 0.0, 5.0], [1.0, 0.0, 0.0, 0.0]]), [0, 1], [2, 3]).tolist() == \
        pytest.approx([0.5, 0.0])
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


class _OneLatent(nn.Module):
    """A crosscoder with one latent: f = <x_B, d> (so f = the planted coefficient), decoding to d at B's sites (the
    last `layers` sites) and 0 at A's."""

    def __init__(self, d: torch.Tensor, layers: int = 1):
        super().__init__()
        self.d_sae, self.d = 1, torch.cat([d] * layers)
        self.W_dec = nn.Parameter(torch.cat([torch.zeros_like(self.d), self.d]).unsqueeze(0))

    def encode(self, x):
        return torch.relu(x[:, len(self.d):] @ self.d / (self.d @ self.d)).unsqueeze(1)

    def output(self, x, f):
        return f @ self.W_dec


def test_latent_scaling_recovers_how_much_of_a_b_only_latent_site_a_carries():
    torch.manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(8), dim=0)
    c = torch.rand(400)
    for beta_a in (0.0, 0.6):
        x = torch.cat([beta_a * c[:, None] * d, c[:, None] * d], dim=1)  # site A carries beta_a of the latent
        sae = _OneLatent(d)
        by_site = SiteMetrics(sae.W_dec, ["A", "B"], [1.0, 1.0])
        evaluate_sae(sae, x, 128, observe=by_site)  # the held-out pass feeds it, batch by batch
        metrics = by_site.compute()
        # beta^s = sum f <d, y^s> / sum f^2 ||d||^2: beta^B = 1, beta^A = beta_a, nu = beta_a (Minder et al.)
        assert metrics["latent_scaling_median"] == pytest.approx(beta_a, abs=1e-5)
        assert metrics["exclusive_b_latents"] == 1
        assert metrics["site_fvu"]["B"] == pytest.approx(0.0, abs=1e-6)

    # two models at two layers: A's two sites against B's, paired in order; A carries 0.6 of the latent at both
    d2 = torch.nn.functional.normalize(torch.randn(8), dim=0)
    x = torch.cat([0.6 * c[:, None] * d, 0.6 * c[:, None] * d2, c[:, None] * d, c[:, None] * d2], dim=1)
    sae = _OneLatent(torch.cat([d, d2]), layers=1)
    by_site = SiteMetrics(sae.W_dec, ["blocks.2", "blocks.3", "diff/blocks.2", "diff/blocks.3"], [1.0] * 4)
    evaluate_sae(sae, x, 128, observe=by_site)
    assert by_site.compute()["latent_scaling_median"] == pytest.approx(0.6, abs=1e-5)


def test_an_l1_crosscoder_learns_both_sites_and_latent_scaling_flags_its_false_b_only_latents(tmp_path):
    """Minder et al.'s (a) and (c) on a two-site world at L0 8 (experiment=crosscoder_diffing runs all three claims
    on a larger world, BatchTopK beside it, in docs/RESULTS.md)."""
    result = run_cli(["data=synthetic", "sae=crosscoder_l1", "data.synthetic.sites=2", "data.synthetic.d_in=32",
                      "data.synthetic.n_features=256", "data.synthetic.exclusive_fraction=0.1",
                      "data.synthetic.ratio_fraction=0.2", "data.train_tokens=768000", "optim.lr=3e-3",
                      "logger=none", "eval.tokens=8192", f"paths.output_dir={tmp_path}",
                      f"hydra.run.dir={tmp_path / 'run'}", "callbacks.progress_bar.refresh_rate=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sites"] == ["site_0", "site_1"] and abs(metrics["l0"] - 8) < 0.5
    assert min(metrics["site_mcc"].values()) > 0.8  # chance for random decoders here: ~0.4
    assert sum(metrics["relative_norm_histogram"]) == metrics["d_sae"] * (1 - metrics["dead_fraction"])
    # (a) many of its B-only latents read as features site A also carries (measured: about half)...
    assert metrics["exclusive_recall"] > 0.6 and metrics["exclusive_precision"] < 0.75
    # (c) ...and Latent Scaling's nu ranks those above the true ones
    assert metrics["latent_scaling_auroc"] > 0.7
    cfg = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["metadata"]["hook_names"] == ["site_0", "site_1"]


def test_a_crosscoder_over_two_layers_trains_evaluates_splices_and_exports(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """In one fan-out group beside an SAE on one of its hooks: one stream serves both."""
    base = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path), "sae=batchtopk", "sae.k=8"]
    result = run_cli(["-m", *base, "hydra/launcher=fanout", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      "model.hook=blocks.1.hook_out,[blocks.0.hook_out,blocks.1.hook_out]", "eval.spliced_windows=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jobs #0, #1 share one activation stream" in result.stdout + result.stderr
    run = tmp_path / "sweep" / "1"
    sae_only = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert "sites" not in sae_only and sae_only["d_in"] == 32
    assert metrics["sites"] == ["blocks.0.hook_out", "blocks.1.hook_out"] and metrics["d_in"] == 64
    assert set(metrics["site_fvu"]) == set(metrics["sites"]) and 0 < metrics["fvu"] < 1
    assert math.isfinite(metrics["delta_lm_loss"]) and metrics["ce_sae"] != metrics["ce_clean"]
    tensors = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (64, metrics["d_sae"])
    # saelab-eval reads what saelab exports: the same sites and the same held-out numbers
    out = tmp_path / "eval"
    evaluated = run_module("saelab.cli.evaluate", [str(run / "sae"), *base, "--out", str(out),
                                                   "eval.spliced_windows=0"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["sites"] == metrics["sites"]
    assert again["relative_norm_histogram"] == metrics["relative_norm_histogram"]  # the export's decoder, per site
    assert again["site_fvu"] == pytest.approx(metrics["site_fvu"], rel=1e-4)
    assert again["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4) and again["l0"] == pytest.approx(metrics["l0"],
                                                                                                    rel=1e-4)
    exported = load_exported(run / "sae")
    assert exported.cfg["metadata"]["hook_names"] == metrics["sites"]
    # the dashboard encodes both sites and shows each latent's decoder norm at each (raw units, as exported)
    build([run, "latents=top:3", "tokens=1e6", "contexts=2"])
    summary = json.loads((run / "dashboard" / "summary.json").read_text())
    assert summary["sae"]["hook"] == ", ".join(metrics["sites"])
    latent = summary["latents"][0]["id"]
    shown = read_latent(run / "dashboard", latent)["site_norms"]
    norms = exported.W_dec[latent].view(2, -1).norm(dim=-1)
    assert shown == {site: pytest.approx(float(n), rel=1e-3) for site, n in zip(metrics["sites"], norms, strict=True)}


@pytest.mark.parametrize(("override", "field"), [
    ("model.hook=[blocks.0.hook_out,blocks.0.hook_out]", "model.hook"),
    ("model.target_hook=blocks.1.hook_out", "model.target_hook"),
])
def test_bad_crosscoder_sites_are_one_line_errors(override, field, tiny_model_dir, tiny_corpus_dir, tmp_path):
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path),
            "model.hook=[blocks.0.hook_out,blocks.1.hook_out]", override]
    assert_one_line_refusal(args, field, tmp_path)


def test_a_crosscoder_splice_replaces_every_site_it_writes(tiny_model_dir, tiny_corpus_dir):
    """Predicting zeros at both sites is zero-ablating both; predicting the clean activations changes nothing."""
    from saelab.data.model import load_model
    from saelab.data.tokens import SpecialTokens
    from saelab.metrics.spliced import Crosscode, spliced_lm_metrics_many

    sites = ("blocks.0.hook_out", "blocks.1.hook_out")
    model = load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": list(sites), "dtype": "float32",
                        "device": "cpu"})
    windows = torch.randint(2, 150, (4, 16), generator=torch.Generator().manual_seed(0))
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    results = spliced_lm_metrics_many(model, {"zero": Crosscode(torch.zeros_like, sites, sites),
                                              "same": Crosscode(lambda x: x, sites, sites)},
                                      windows, special, 2, sites)
    assert results["zero"]["ce_sae"] == pytest.approx(results["zero"]["ce_zero"], rel=1e-6)
    assert results["same"]["ce_sae"] == pytest.approx(results["same"]["ce_clean"], rel=1e-6)
    assert results["zero"]["ce_zero"] != pytest.approx(results["zero"]["ce_clean"], rel=1e-3)
