"""Gated SAE: which loss term trains which parameter (SPEC section 2), exports, and the L_aux ablation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import build_sae, sae_config
from saelab.saes.gated import UNTIED_ARCHITECTURE, GatedSAE
from saelab.saes.saelens_format import export_sae, load_exported

TARGET = "saelab.saes.gated.GatedSAE"
D_IN, D_SAE = 8, 16


def make(**overrides) -> GatedSAE:
    torch.manual_seed(0)
    sae = build_sae({"_target_": TARGET, "d_in": D_IN, "d_sae": D_SAE, **overrides})
    with torch.no_grad():  # away from the all-zero init, so every path carries a signal
        for name in ("b_gate", "b_mag", "r_mag", "b_dec"):
            if isinstance(getattr(sae, name, None), torch.nn.Parameter):
                getattr(sae, name).normal_(0, 0.2)
    return sae


def term_grads(sae: GatedSAE, term: str, x: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Gradient of one named loss term with respect to every parameter (None = not reached)."""
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) if x is None else x
    terms = sae.training_loss(x, {"sparsity": 0.1}).terms
    names, params = zip(*sae.named_parameters(), strict=True)
    grads = torch.autograd.grad(terms[term], params, allow_unused=True)
    return dict(zip(names, grads, strict=True))


def reached(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


# -- gradient facts -------------------------------------------------------------------------------------
def test_heaviside_gate_passes_no_reconstruction_gradient_to_the_gate():
    grads = term_grads(make(), "rec")
    assert not reached(grads["b_gate"])
    assert all(reached(grads[name]) for name in ("W_enc", "b_mag", "r_mag", "W_dec", "b_dec"))


def test_frozen_decoder_aux_loss_sends_no_gradient_to_the_decoder():
    grads = term_grads(make(aux_loss="frozen_decoder"), "aux")
    assert not reached(grads["W_dec"]) and not reached(grads["b_dec"])
    assert reached(grads["W_enc"]) and reached(grads["b_gate"])  # L_aux is what trains the gate


def test_frozen_decoder_sparsity_term_sends_no_gradient_to_the_decoder():
    for sparsity, constraint in (("l1", "unit_norm"), ("ri_l1", "none")):
        grads = term_grads(make(aux_loss="frozen_decoder", sparsity=sparsity, decoder_constraint=constraint),
                           "sparsity")
        assert not reached(grads["W_dec"]) and not reached(grads["b_dec"]), sparsity
        assert reached(grads["b_gate"])


def test_unfrozen_decoder_aux_loss_trains_the_decoder():
    grads = term_grads(make(aux_loss="unfrozen_decoder"), "aux")
    assert reached(grads["W_dec"]) and reached(grads["b_dec"]) and reached(grads["b_gate"])
    # Under ri_l1 the penalty's ||d_i|| is then live too (the authors' consistency rule).
    ri_l1 = make(aux_loss="unfrozen_decoder", sparsity="ri_l1", decoder_constraint="none")
    assert reached(term_grads(ri_l1, "sparsity")["W_dec"])


def test_no_aux_loss_leaves_only_the_sparsity_term_on_the_gate():
    sae = make(aux_loss="none")
    assert set(sae.training_loss(torch.randn(4, D_IN), {"sparsity": 0.1}).terms) == {"rec", "sparsity"}


def test_r_mag_false_is_not_trainable():
    sae = make(r_mag=False)
    assert "r_mag" not in dict(sae.named_parameters())
    assert torch.count_nonzero(sae.r_mag) == 0  # a buffer, exported as zeros
    assert reached(term_grads(sae, "rec")["W_enc"])


def test_sigmoid_gate_lets_the_reconstruction_train_the_gate():
    grads = term_grads(make(gate="sigmoid", gate_temperature=0.5), "rec")
    assert reached(grads["b_gate"])


def test_sigmoid_gate_is_binarised_at_evaluation():
    sae = make(gate="sigmoid", gate_temperature=0.5)
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        pi_gate, _, pi_mag = sae.preacts(x)
        torch.testing.assert_close(sae.encode(x), (pi_gate > 0).float() * torch.relu(pi_mag))
        out = sae.training_loss(x, {"sparsity": 0.1})
    torch.testing.assert_close(out.feature_acts, sae.encode(x))  # honest L0 in training logs too
    assert (sae.encode(x) > 0).float().mean() < (torch.relu(pi_mag) > 0).float().mean()


def test_tied_magnitude_path_equals_its_definition():
    sae = make()
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        pi_gate, pi_gate_sg, pi_mag = sae.preacts(x)
        x_c = x - sae.b_dec
        torch.testing.assert_close(pi_gate, x_c @ sae.W_enc + sae.b_gate)
        torch.testing.assert_close(pi_gate_sg, pi_gate, rtol=0, atol=0)
        torch.testing.assert_close(pi_mag, x_c @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)


# -- decoder constraint and config ----------------------------------------------------------------------
def test_decoder_rows_stay_unit_norm_after_optimiser_steps():
    sae = make()
    opt = torch.optim.Adam(sae.parameters(), lr=0.05, betas=sae.recipe_adam_betas)
    for _ in range(5):
        loss = sum(sae.training_loss(torch.randn(128, D_IN), {"sparsity": 0.1}).terms.values())
        opt.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("field", "value"), [
    ("aux_loss", "frozen"), ("gate", "relu"), ("gate_temperature", 0.0), ("r_mag", "yes"),
    ("tie_encoder", 1), ("sparsity", "l0"),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"sae.{field}="):
        build_sae({"_target_": TARGET, "d_in": D_IN, "d_sae": D_SAE, field: value})


# -- export ---------------------------------------------------------------------------------------------
SCALE = 3.7


def raw_batch() -> torch.Tensor:
    return SCALE * (torch.randn(512, D_IN, generator=torch.Generator().manual_seed(2)) + 0.3)


def as_jumprelu(sae: GatedSAE) -> SimpleNamespace:
    """Something `export_sae` can write: the Gated SAE seen through its JumpReLU tensors."""
    return SimpleNamespace(d_in=sae.d_in, d_sae=sae.d_sae, cfg=sae.cfg, centres_input=sae.centres_input,
                           transcoder=False,
                           exported_tensors=lambda scale, *_: sae.export_as_jumprelu_tensors(scale),
                           exported_config=lambda: {"architecture": "jumprelu"})


@pytest.mark.parametrize("overrides", [{}, {"r_mag": False}, {"gate": "sigmoid", "gate_temperature": 0.5}])
@pytest.mark.parametrize("architecture", ["gated", "jumprelu"])
def test_exports_reproduce_reconstructions_on_raw_activations(tmp_path, overrides, architecture):
    sae = make(**overrides)
    theta = sae.b_mag - sae.r_mag.exp() * sae.b_gate
    assert (theta > 0).any() and (theta < 0).any()  # both sides of the JumpReLU threshold's clamp at 0
    target = sae if architecture == "gated" else as_jumprelu(sae)
    exported = load_exported(export_sae(target, SCALE, tmp_path / "sae", {}))
    assert exported.cfg["architecture"] == architecture
    x_raw = raw_batch()
    with torch.no_grad():
        f = sae.encode(x_raw / SCALE)
        assert 0.05 < (f > 0).float().mean() < 0.95
        torch.testing.assert_close(exported.encode(x_raw), SCALE * f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(exported(x_raw), SCALE * sae(x_raw / SCALE), atol=1e-4, rtol=1e-4)


def test_tied_gated_sae_and_its_jumprelu_give_identical_reconstructions(tmp_path):
    sae = make()
    gated = load_exported(export_sae(sae, 1.0, tmp_path / "gated", {}))
    jump = load_exported(export_sae(as_jumprelu(sae), 1.0, tmp_path / "jumprelu", {}))
    x = raw_batch()
    with torch.no_grad():
        torch.testing.assert_close(jump(x), gated(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(jump(x), sae(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(jump.encode(x) > 0, sae.encode(x) > 0)


def test_untied_export_is_labelled_and_reproduces_the_sae(tmp_path):
    sae = make(tie_encoder=False)
    with torch.no_grad():
        sae.W_mag.normal_(0, 0.3)
    path = export_sae(sae, SCALE, tmp_path / "sae", {})
    exported = load_exported(path)
    assert exported.cfg["architecture"] == UNTIED_ARCHITECTURE  # not a SAELens architecture: no silent misuse
    t, x_raw = exported, raw_batch()
    x_c = x_raw - t.b_dec
    f = (x_c @ t.W_enc + t.b_gate > 0).float() * torch.relu(x_c @ t.W_mag + t.b_mag)
    with torch.no_grad():
        torch.testing.assert_close(f @ t.W_dec + t.b_dec, SCALE * sae(x_raw / SCALE), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(exported(x_raw), SCALE * sae(x_raw / SCALE), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tie_encoder"):
        sae.export_as_jumprelu_tensors(SCALE)


# -- the L_aux ablation on data with known structure ----------------------------------------------------
def sparse_dictionary_data(n: int, seed: int) -> torch.Tensor:
    """Tokens made of 3 of 64 fixed unit directions in R^32 with magnitudes in [0.5, 1.5), E||x||^2 = 1."""
    directions = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    directions /= directions.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    which, magnitude = torch.randint(0, 64, (n, 3), generator=g), torch.rand(n, 3, generator=g) + 0.5
    codes = torch.zeros(n, 64).scatter_(1, which, magnitude)
    x = codes @ directions
    return x / x.pow(2).sum(-1).mean().sqrt()


def train_and_measure_l0(aux_loss: str) -> tuple[float, float]:
    torch.manual_seed(0)
    sae = build_sae({"_target_": TARGET, "d_in": 32, "d_sae": 64, "aux_loss": aux_loss})
    opt = torch.optim.Adam(sae.parameters(), lr=5e-3, betas=sae.recipe_adam_betas)
    for x in sparse_dictionary_data(150 * 256, seed=1).split(256):
        loss = sum(sae.training_loss(x, {"sparsity": 0.5}).terms.values())
        opt.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    x = sparse_dictionary_data(4096, seed=99)  # held out
    with torch.no_grad():
        x_hat = sae(x)
        l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    return l0, ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_without_aux_loss_the_gate_collapses(one_thread):
    l0_none, fvu_none = train_and_measure_l0("none")
    l0_frozen, fvu_frozen = train_and_measure_l0("frozen_decoder")
    assert l0_none < 1.0, l0_none  # the sparsity term alone drives pi_gate below 0
    assert l0_frozen > 3.0, l0_frozen
    assert fvu_frozen < 0.5 * fvu_none, (fvu_frozen, fvu_none)


def test_a_null_coefficient_starts_at_the_gates_own_lambda():
    """sae.sparsity_coefficient null (gated.yaml's default): the Heaviside gate's L1 starts at 0.15, the sigmoid
    gate's soft count, ~30x larger per latent, at 0.005; a given coefficient is kept whatever the gate."""
    base = {"_target_": "saelab.saes.gated.GatedSAE", "d_in": 8, "d_sae": 16}
    assert sae_config(base | {"sparsity_coefficient": None})[1].sparsity_coefficient == 0.15
    assert sae_config(base | {"sparsity_coefficient": None, "gate": "sigmoid"})[1].sparsity_coefficient == 0.005
    assert sae_config(base | {"sparsity_coefficient": 0.3, "gate": "sigmoid"})[1].sparsity_coefficient == 0.3
