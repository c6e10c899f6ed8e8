"""Cross-layer transcoders (Ameisen et al. 2025; SPEC section 7) on the sites contract: the block shape every
variant keeps, the loss and penalty against the SPEC's formulas, the layered world's ground truth, the
replacement-model splice, the circuit-tracer export (formula here; circuit-tracer itself in its venv), and runs."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from saelab.data.synthetic import SyntheticSpec
from saelab.data.synthetic_layers import LayeredWorld
from saelab.errors import ConfigError
from saelab.saes.base import build_sae
from saelab.saes.circuit_tracer_format import export_circuit_tracer
from saelab.sites import Sites, column_scales
from tests.conftest import REPO, assert_one_line_refusal, run_cli, run_module, tiny_overrides
from tests.test_dashboard import build, read_latent
from tests.test_native_kernels import block_mask

L, D, F = 3, 8, 6  # layers, width, latents per layer
VARIANTS = {
    "relu": {"_target_": "saelab.saes.relu.ReluSAE", "sparsity_coefficient": 0.1},
    "jumprelu_tanh": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity": "tanh",
                      "decoder_constraint": "none", "sparsity_coefficient": 0.1},
    "jumprelu": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity_coefficient": 0.1},
    "topk": {"_target_": "saelab.saes.topk.TopKSAE", "k": 4},
    "batchtopk": {"_target_": "saelab.saes.batchtopk.BatchTopKSAE", "k": 4},
    "gated": {"_target_": "saelab.saes.gated.GatedSAE", "sparsity_coefficient": 0.1},
}


def clt(variant: str, cross_layer: bool = True, **changes):
    return build_sae({**VARIANTS[variant], "d_in": D, "d_out": D, "sites": L, "d_sae": L * F,
                      "cross_layer": cross_layer, **changes})


def blocks(W, rows: int, cols: int):
    """W as [row block, col block] pieces."""
    return [[W[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] for j in range(L)] for i in range(L)]


def test_sites_pair_each_mlp_input_with_its_output_and_refuse_a_mismatch():
    sites = Sites.of(["a0", "a1"], ["b0", "b1"])
    assert sites.cross_layer and not sites.crosscoder and sites.several
    assert sites.scaled == ("a0", "a1", "b0", "b1") and sites.hooks == ["a0", "a1", "b0", "b1"]
    batch = {h: torch.full((2, 3), float(i)) for i, h in enumerate(sites.hooks)}
    assert torch.equal(sites.target(batch), torch.cat([batch["b0"], batch["b1"]], -1))
    for reads, writes in ((["a0", "a1"], ["b0"]), (["a0", "a1"], ["b0", "a1"]), (["a0", "a1"], ["b0", "b0"])):
        with pytest.raises(ConfigError, match="model.target_hook"):
            Sites.of(reads, writes).check()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cross_layer", [True, False])
def test_every_variant_keeps_the_block_shape_through_training_steps(variant, cross_layer):
    """Encoders read their own layer; decoders write their layer and later ones (or their layer alone)."""
    torch.manual_seed(0)
    sae = clt(variant, cross_layer)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x, y = torch.randn(64, L * D), torch.randn(64, L * D)
    for _ in range(3):
        step = sae.training_loss(x, {"sparsity": 0.1}, target=y)
        opt.zero_grad()
        sum(step.terms.values()).backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    enc, dec = blocks(sae.W_enc, D, F), blocks(sae.W_dec, F, D)
    for i in range(L):
        for j in range(L):
            assert (enc[i][j].abs().sum() > 0) == (i == j)
            writes = j >= i if cross_layer else j == i
            assert (dec[i][j].abs().sum() > 0) == writes, (i, j)
    if sae.elementwise_encoder:  # causal: layer l's output depends on layers <= l's inputs alone
        sae.eval()
        later = x.clone()
        later[:, D:] = torch.randn(64, (L - 1) * D)
        assert torch.allclose(sae(x)[:, :D], sae(later)[:, :D], atol=1e-6)


def test_the_loss_is_the_sum_of_every_layers_error_and_the_tanh_penalty_prices_all_of_a_latents_decoders():
    """SPEC section 7: y_hat_l = sum_{l' <= l} W_dec^{l'->l} f_l' + b_dec^l; penalty lambda sum tanh(c f ||W_dec^i||)
    with the norm of latent i's decoders to all later layers, concatenated."""
    torch.manual_seed(1)
    sae = clt("jumprelu_tanh")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.raw_threshold.fill_(0.01)
    x, y = torch.randn(32, L * D), torch.randn(32, L * D)
    f = sae.encode(x)
    W = sae.W_dec.detach()
    y_hat = torch.zeros_like(y)
    for out in range(L):
        y_hat[:, out * D:(out + 1) * D] = sae.b_dec[out * D:(out + 1) * D].detach()
        for src in range(out + 1):
            y_hat[:, out * D:(out + 1) * D] += f[:, src * F:(src + 1) * F] @ W[src * F:(src + 1) * F,
                                                                                 out * D:(out + 1) * D]
    assert torch.allclose(sae(x), y_hat, atol=1e-5)
    step = sae.training_loss(x, {"sparsity": 0.5}, target=y)
    assert step.terms["rec"].item() == pytest.approx(((y - y_hat) ** 2).sum(-1).mean().item(), rel=1e-5)
    norms = torch.stack([W[i, i // F * D:].norm() for i in range(L * F)])  # row i's blocks from its own layer on
    c = sae.cfg.tanh_scale
    assert step.terms["sparsity"].item() == pytest.approx(0.5 * torch.tanh(c * f * norms).sum(-1).mean().item(),
                                                          rel=1e-5)


def test_the_layered_world_writes_each_feature_at_its_home_layer_and_a_cross_layer_one_at_every_later_one():
    spec = SyntheticSpec(d_in=16, n_features=90, mean_l0=4, n_parents=0, layers=3, cross_layer_fraction=0.4,
                         noise_std=0.0)
    world = LayeredWorld(spec)
    codes, _ = world.codes(100, torch.Generator().manual_seed(1))
    x = world.mix(codes, torch.Generator().manual_seed(2))
    for layer in range(3):
        present = (world.home <= layer).float()
        assert torch.allclose(x[:, 16 * layer:16 * (layer + 1)], (codes * present) @ world.input_dictionary,
                              atol=1e-5)
        written = ((world.home == layer) | (world.cross & (world.home <= layer))).float()
        out = x[:, 16 * (3 + layer):16 * (4 + layer)]
        assert torch.allclose(out, (codes * written) @ world.output_dictionary[layer], atol=1e-5)
    assert world.writes.sum(1).max() == 3 and 0.3 < world.cross.float().mean() < 0.5


def test_the_export_folds_each_sides_scales_in_and_the_circuit_tracer_files_compute_saelabs_outputs(tmp_path):
    """W_enc_i = the diagonal encoder block (transposed), W_dec_i[:, j] = the block writing layer i + j; on raw inputs
    the files give what saelab computes on normalised ones, times each output site's scale."""
    torch.manual_seed(2)
    sae = clt("jumprelu")
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.layer_structure.apply(sae)
        sae.raw_threshold.uniform_(0.1, 0.4)
    scales = (1 + 3 * torch.rand(2 * L)).tolist()
    reads, writes = [f"blocks.{i}.hook_resid_mid" for i in range(L)], [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    export_circuit_tracer(sae.exported_tensors(scales[0], None, scales), L, tmp_path / "ct", reads, writes, "m")
    assert (tmp_path / "ct" / "config.yaml").read_text().startswith("model_kind: cross_layer_transcoder")
    x_raw = torch.randn(20, L * D) * column_scales(scales[:L], D)
    sae.eval()
    with torch.no_grad():
        want_out = sae(x_raw / column_scales(scales[:L], D)) * column_scales(scales[L:], D)
        want_f = sae.encode(x_raw / column_scales(scales[:L], D)) * scales[0]
    out = torch.zeros(20, L * D)
    for i in range(L):
        enc = load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors"))
        dec = load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        assert dec.shape == (F, L - i, D)
        pre = x_raw[:, i * D:(i + 1) * D] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        f = pre * (pre > enc[f"threshold_{i}"])
        assert torch.allclose(f, want_f[:, i * F:(i + 1) * F], atol=1e-5)
        out[:, i * D:(i + 1) * D] += enc[f"b_dec_{i}"]
        for j in range(L - i):
            out[:, (i + j) * D:(i + j + 1) * D] += f @ dec[:, j]
    assert (want_f > 0).float().mean() > 0.1
    assert torch.allclose(out, want_out, atol=1e-4)


def test_circuit_tracer_loads_saelabs_export_and_computes_the_same_latents_and_outputs():
    """circuit-tracer 0.5.0's own load_clt in its venv (scripts/circuit_tracer_compat), on saelab's export."""
    venv = os.environ.get("CIRCUIT_TRACER_VENV", os.path.expanduser("~/.cache/saelab/circuit-tracer-venv"))
    try:
        result = subprocess.run(["bash", "scripts/circuit_tracer_compat/check_saelab.sh"], cwd=REPO,
                                capture_output=True, text=True, timeout=1200,
                                env={**os.environ, "CIRCUIT_TRACER_VENV": venv, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.skip(f"circuit-tracer's venv ({venv}) could not be made in 20 minutes: skipped its load")
    if result.returncode != 0 and not os.path.exists(os.path.join(venv, "bin", "python")):
        pytest.skip(f"circuit-tracer's venv ({venv}) could not be made (no PyPI?): skipped its load")
    assert result.returncode == 0 and result.stdout.strip().endswith("all OK"), result.stdout[-3000:] + result.stderr[
        -2000:]
    assert result.stdout.count("OK jumprelu") >= 20 and "FAIL" not in result.stdout


def test_a_clt_recovers_a_cross_layer_feature_with_one_latent_where_per_layer_transcoders_need_one_a_layer(tmp_path):
    """One fan-out group on the layered world: the CLT and the per-layer transcoders share one stream."""
    result = run_cli(["-m", "hydra/launcher=fanout", "data=synthetic", "data.synthetic.layers=3",
                      "data.synthetic.d_in=32", "data.synthetic.n_features=256", "data.train_tokens=384000",
                      "sae=relu", "sae.expansion_factor=4", "logger=csv", f"hydra.sweep.dir={tmp_path}",
                      "callbacks.progress_bar.refresh_rate=0", "sae.cross_layer=true,false"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jobs #0, #1 share one activation stream" in result.stdout + result.stderr
    clt_m, plt_m = (json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in (0, 1))
    assert clt_m["cross_layer"] and not plt_m["cross_layer"]
    assert clt_m["sites"] == ["in_0", "in_1", "in_2", "out_0", "out_1", "out_2"]
    assert set(clt_m["site_fvu"]) == {"out_0", "out_1", "out_2"}
    assert plt_m["latents_per_cross_feature"] > 2 and clt_m["latents_per_cross_feature"] < 1.6
    assert clt_m["cross_features_recovered"] > 3 * plt_m["cross_features_recovered"]
    assert clt_m["fvu"] < plt_m["fvu"]
    assert (tmp_path / "0" / "circuit_tracer" / "W_dec_0.safetensors").exists()
    assert not (tmp_path / "1" / "circuit_tracer").exists()


def test_the_replacement_splice_feeds_each_layers_output_into_the_next_layers_input(tiny_model_dir):
    """A CLT predicting zeros is zero-ablating every MLP output at once: the spliced pass's input at layer 1 is
    the clean pass's with layer 0's MLP output zeroed, and the prediction for layer l sees inputs up to l only."""
    from saelab.data.model import load_model
    from saelab.metrics.spliced import CrossLayerTranscode, _splice_hooks

    reads, writes = ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"), ("blocks.0.hook_mlp_out",
                                                                              "blocks.1.hook_mlp_out")
    model = load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": list(reads), "dtype": "float32",
                        "device": "cpu"})
    tokens = torch.randint(2, 150, (2, 10), generator=torch.Generator().manual_seed(0))
    seen = []

    def predict(x):
        seen.append(x.clone())
        return torch.zeros(*x.shape[:-1], 2 * model.d_model)

    hooks = _splice_hooks(model, tokens, writes, CrossLayerTranscode(predict, reads, writes), torch.ones(2, 10,
                                                                                                         dtype=bool))
    with torch.no_grad():
        model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        kept = []
        model.bridge.run_with_hooks(tokens, fwd_hooks=[(writes[0], lambda acts, hook: torch.zeros_like(acts)),
                                                       (reads[1], lambda acts, hook: kept.append(acts.clone()))])
        _, clean = model.bridge.run_with_cache(tokens, names_filter=list(reads))
    d = model.d_model
    assert len(seen) == 2 and torch.equal(seen[0][..., d:], torch.zeros_like(seen[0][..., d:]))  # layer 1: later
    assert torch.allclose(seen[1][..., d:], kept[0], atol=1e-5)  # what the spliced pass reached
    assert not torch.allclose(seen[1][..., d:], clean[reads[1]], atol=1e-3)  # not the clean pass's


def test_a_clt_on_a_model_trains_splices_exports_evaluates_and_shows_per_layer_norms(tiny_model_dir, tiny_corpus_dir,
                                                                                      tmp_path):
    reads = "[blocks.0.hook_resid_mid,blocks.1.hook_resid_mid]"
    writes = "[blocks.0.hook_mlp_out,blocks.1.hook_mlp_out]"
    base = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path), f"model.hook={reads}",
            f"model.target_hook={writes}", "sae=jumprelu", "sae.sparsity=tanh", "sae.decoder_constraint=none"]
    run = tmp_path / "run"
    result = run_cli([*base, f"hydra.run.dir={run}", "eval.spliced_windows=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["architecture"] == "jumprelu_transcoder" and metrics["d_sae"] == 2 * 4 * 32
    assert set(metrics["site_fvu"]) == {"blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"}
    assert math.isfinite(metrics["delta_lm_loss"]) and metrics["ce_sae"] != metrics["ce_clean"]
    assert load_file(str(run / "circuit_tracer" / "W_dec_0.safetensors"))["W_dec_0"].shape == (128, 2, 32)
    assert "feature_input_hook: hook_resid_mid" in (run / "circuit_tracer" / "config.yaml").read_text()
    out = tmp_path / "eval"
    evaluated = run_module("saelab.cli.evaluate", [str(run / "sae"), *base, "--out", str(out),
                                                   "eval.spliced_windows=8"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["site_fvu"] == pytest.approx(metrics["site_fvu"], rel=1e-4)
    assert again["delta_lm_loss"] == pytest.approx(metrics["delta_lm_loss"], rel=1e-3, abs=1e-5)
    build([run, "latents=top:3", "tokens=1e6", "contexts=2"])
    summary = json.loads((run / "dashboard" / "summary.json").read_text())
    W_dec = load_file(str(run / "sae" / "sae_weights.safetensors"))["W_dec"]  # raw units, as exported
    for entry in summary["latents"]:
        shown = read_latent(run / "dashboard", entry["id"])["site_norms"]
        norms = W_dec[entry["id"]].view(2, -1).norm(dim=-1)  # one block an output layer; a layer-1 latent's first
        assert shown == {"blocks.0.hook_mlp_out": pytest.approx(float(norms[0]), rel=1e-3, abs=1e-9),  # is zero
                         "blocks.1.hook_mlp_out": pytest.approx(float(norms[1]), rel=1e-3)}


@pytest.mark.parametrize(("override", "field"), [
    ("model.target_hook=[blocks.0.hook_mlp_out]", "model.target_hook"),
    ("model.target_hook=[blocks.1.hook_mlp_out,blocks.0.hook_mlp_out]", "model.hook"),
    ("model.target_hook=[blocks.0.hook_mlp_out,blocks.7.hook_mlp_out]", "model.target_hook"),
])
def test_bad_clt_sites_are_one_line_errors(override, field, tiny_model_dir, tiny_corpus_dir, tmp_path):
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path),
            "model.hook=[blocks.0.hook_resid_mid,blocks.1.hook_resid_mid]", override]
    assert_one_line_refusal(args, field, tmp_path)


def test_a_topk_clts_block_encoder_is_the_dense_product():
    """TopK's fused step computes a CLT's pre-activations from the diagonal blocks alone: x W_enc all the same."""
    torch.manual_seed(3)
    sae = clt("batchtopk")
    x = torch.randn(16, L * D)
    bias = torch.randn(L * F)
    with torch.no_grad():  # as training_selection calls it (the sparse backward gives the gradient)
        pre, pending = sae.float32_preacts(x, bias)
    dense = x @ sae.W_enc + (bias if pending is None else 0)
    assert torch.allclose(pre, dense, atol=1e-5) and not torch.equal(pre, torch.zeros_like(pre))


@pytest.mark.parametrize("cross_layer", [True, False])
def test_block_products_equal_the_dense_products_of_block_shaped_weights(cross_layer):
    """The dense step's five matmuls over a CLT's blocks alone (kernels/block_products.py) against plain dense
    matmuls of the block-shaped weights; a weight gradient is the dense one on its blocks and 0 elsewhere."""
    torch.manual_seed(4)
    sae = clt("relu", cross_layer)
    enc_mask, dec_mask = block_mask(L, D, F, suffix=False), block_mask(L, F, D, suffix=cross_layer)
    W_enc, W_dec = torch.randn(L * D, L * F) * enc_mask, torch.randn(L * F, L * D) * dec_mask
    x, f, g, gf = torch.randn(32, L * D), torch.randn(32, L * F), torch.randn(32, L * D), torch.randn(32, L * F)
    bias_f, bias_y = torch.randn(L * F), torch.randn(L * D)
    products = sae.products
    torch.testing.assert_close(products.encode(x, W_enc, bias_f), x @ W_enc + bias_f)
    torch.testing.assert_close(products.decode(f, W_dec, bias_y), f @ W_dec + bias_y)
    torch.testing.assert_close(products.decode_t(g, W_dec, bias_f), g @ W_dec.t() + bias_f)
    torch.testing.assert_close(products.decoder_grad(f, g), (f.t() @ g) * dec_mask)
    torch.testing.assert_close(products.encoder_grad(x, gf), (x.t() @ gf) * enc_mask)


@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
def test_a_dense_clts_fused_step_takes_the_gradients_autograd_takes(variant):
    """The fused kernels run a CLT's matmuls over its blocks: the loss terms and (masked) gradients equal those of
    plain autograd through the dense block-shaped weights."""
    torch.manual_seed(5)
    x, y = torch.randn(64, L * D), torch.randn(64, L * D)
    results = []
    for fused in (True, False):
        torch.manual_seed(6)
        sae = clt(variant)
        if not fused:
            sae.fused_ok = lambda x: False
        step = sae.training_loss(x, {"sparsity": 0.1}, target=y)
        sum(step.terms.values()).backward()
        sae.before_optimizer_step()
        results.append(({k: v.item() for k, v in step.terms.items()},
                        {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}))
    (fused_terms, fused_grads), (plain_terms, plain_grads) = results
    assert fused_terms == pytest.approx(plain_terms, rel=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and "W_enc" in fused_grads
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5)
