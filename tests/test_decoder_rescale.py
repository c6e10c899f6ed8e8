"""sae.decoder_constraint=rescale: SAELens's `rescale_acts_by_decoder_norm` for the TopK family.

The references are SAELens's formulas written out here (sae_lens/saes/topk_sae.py): with raw parameters W'_enc,
b'_enc and a free decoder V, hidden_pre = ((x - b_dec) W'_enc + b'_enc) * ||V_i||, z = TopK(ReLU(hidden_pre)),
x_hat = (z / ||V_i||) V + b_dec.
"""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.run.member import SAEMember
from saelab.saes.base import build_sae
from saelab.saes.decoder_rescale import raw_parameter, variant_class
from tests.conftest import optim_config

D_IN, D_SAE, K = 24, 160, 6


def rescaled(variant: str = "topk", **extra):
    targets = {"topk": "saelab.saes.topk.TopKSAE", "batchtopk": "saelab.saes.batchtopk.BatchTopKSAE"}
    cfg = {"_target_": targets[variant], "d_in": D_IN, "d_sae": D_SAE, "k": K, "decoder_init_norm": 0.1,
           "decoder_constraint": "rescale", "auxk_alpha": 0.0, **extra}
    torch.manual_seed(0)
    sae = build_sae(cfg)
    with torch.no_grad():  # off the tied initialisation, so every term of the formula matters
        raw_parameter(sae, "b_enc").normal_(0, 0.02)
        sae.b_dec.normal_(0, 0.1)
        raw_parameter(sae, "W_dec").mul_(torch.rand(D_SAE, 1) + 0.5)  # unequal row norms
    return sae


def saelens_forward(raw: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """SAELens's TopK training forward with rescale_acts_by_decoder_norm=True (written from its source)."""
    norms = raw["W_dec"].norm(dim=1)
    hidden_pre = ((x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]) * norms
    acts = torch.relu(hidden_pre)
    top = acts.topk(k, dim=-1)
    z = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    return (z / norms) @ raw["W_dec"] + raw["b_dec"]


def raw_tensors(sae) -> dict[str, torch.Tensor]:
    return {name: raw_parameter(sae, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_the_rescaled_topk_computes_saelens_function_and_gradients():
    sae = rescaled()
    x = torch.randn(48, D_IN)
    assert variant_class(sae).__name__ == "TopKSAE"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)  # the SAE sees unit rows

    sae.zero_grad()
    assert sae.fused_ok(x)  # the sparse kernels run on the rescaled weights
    member = SAEMember(sae, {"lr": 1e-3}, max_steps=10, dead_window_tokens=10**9)
    loss, _ = member.step_loss(x, {})  # as training steps it: each weight computed once (weights_once)
    loss.backward()
    got = {name: tensor.grad.clone() for name, tensor in raw_tensors(sae).items()}

    reference = {name: tensor.detach().clone().requires_grad_() for name, tensor in raw_tensors(sae).items()}
    x_hat = saelens_forward(reference, x, K)
    assert torch.allclose(sae.reconstruct(x), x_hat.detach(), atol=1e-5)
    (x - x_hat).pow(2).sum(-1).mean().backward()
    for name, tensor in reference.items():
        error = (got[name] - tensor.grad).norm() / tensor.grad.norm()
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"


def test_a_small_decoder_turns_faster_under_adam():
    """Why the parametrisation matters: Adam moves the raw rows by ~lr, so rows at norm 0.1 turn ~10x more per step
    than rows at norm 1 (the same step on the same data otherwise)."""
    turned = {}
    for norm in (0.1, 1.0):
        sae = rescaled(decoder_init_norm=norm)
        before = sae.W_dec.detach().clone()
        optimiser = torch.optim.Adam(sae.parameters(), lr=1e-3)
        sum(sae.training_loss(torch.randn(256, D_IN), {}).terms.values()).backward()
        optimiser.step()
        cos = torch.nn.functional.cosine_similarity(sae.W_dec.detach(), before, dim=1)
        moved = cos < 1 - 1e-9
        turned[norm] = torch.arccos(cos[moved].clamp(max=1.0)).mean()
    assert 5 < float(turned[0.1] / turned[1.0]) < 20


def test_export_folds_the_norms_and_a_round_trip_keeps_the_function(tmp_path):
    sae = rescaled()
    x = torch.randn(32, D_IN)
    tensors = sae.export_tensors(scale=1.0)
    assert torch.allclose(tensors["W_dec"].norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(x @ tensors["W_enc"], x @ sae.W_enc.detach(), atol=1e-6)

    fresh = rescaled()
    with torch.no_grad():
        raw_parameter(fresh, "W_enc").normal_()
    fresh.import_tensors(tensors, scale=1.0)  # init_from: exact for unit-norm decoder rows
    assert torch.allclose(fresh.reconstruct(x), sae.reconstruct(x), atol=1e-5)

    resumed = rescaled()  # a checkpoint holds the raw tensors under their parametrised names
    resumed.load_state_dict(sae.state_dict())
    assert torch.equal(resumed.reconstruct(x), sae.reconstruct(x))


def test_batchtopk_takes_it_and_the_other_variants_refuse_it():
    batch = rescaled("batchtopk")
    assert variant_class(batch).__name__ == "BatchTopKSAE"
    member = SAEMember(batch, {"lr": 1e-3}, max_steps=10, dead_window_tokens=10**9)
    loss, _ = member.step_loss(torch.randn(64, D_IN), {})
    loss.backward()
    for name, tensor in raw_tensors(batch).items():  # every raw tensor trains (the encoder's through the selection)
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    for target in ("saelab.saes.relu.ReluSAE", "saelab.saes.jumprelu.JumpReLUSAE", "saelab.saes.gated.GatedSAE"):
        with pytest.raises(ConfigError, match="sae.decoder_constraint") as failure:
            build_sae({"_target_": target, "d_in": D_IN, "d_sae": D_SAE, "decoder_constraint": "rescale"})
        assert "rescale" in str(failure.value) and "\n" not in str(failure.value)


def test_a_rescaled_decoder_trains_without_warm_up_unless_asked():
    """optim.lr_warmup_steps null is the SAE's recipe: no warm-up for a rescaled decoder, 20 steps from 0.1 lr
    otherwise; a number is used as given."""
    optim = optim_config(lr=1e-3, lr_warmup_steps=None, lr_warmup="linear", lr_decay_fraction=0.0)
    plain = rescaled(decoder_constraint="unit_norm")
    assert SAEMember(rescaled(), optim, max_steps=100, dead_window_tokens=10**9).lr_lambda(0) == 1.0
    assert SAEMember(plain, optim, max_steps=100, dead_window_tokens=10**9).lr_lambda(0) == pytest.approx(0.1)
    assert SAEMember(plain, optim, max_steps=100, dead_window_tokens=10**9).lr_lambda(20) == 1.0
    given = {**optim, "lr_warmup_steps": 10}
    assert SAEMember(rescaled(), given, max_steps=100, dead_window_tokens=10**9).lr_lambda(0) == pytest.approx(0.1)
