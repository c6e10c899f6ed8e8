"""Scale-dependent knobs hold under every data.normalize (issue: JumpReLU's bandwidth and thresholds, Gated's
temperature and every sparsity coefficient were used unchanged on inputs ~20x larger).

SPEC section 0: if inputs scale by s, pre-activations, thresholds and bandwidths scale by s, the MSE by s^2, an
L1 coefficient by s and an L0 coefficient by s^2. The knobs are given in units of E||x||^2 = 1 and converted,
so the same SAE on inputs scaled by s (its biases scaled by s) is the same SAE: same active latents, same
balance between its loss terms, same pre-activations inside JumpReLU's STE window.
"""

from __future__ import annotations

import pytest
import torch

from saelab.saes.base import build_sae
from tests.conftest import run_cli, tiny_overrides

VARIANTS = {
    "relu": {"_target_": "saelab.saes.relu.ReluSAE", "sparsity_coefficient": 0.1},
    "gated": {"_target_": "saelab.saes.gated.GatedSAE", "sparsity_coefficient": 0.15},
    "gated_sigmoid": {"_target_": "saelab.saes.gated.GatedSAE", "gate": "sigmoid", "gate_temperature": 0.05,
                      "sparsity_coefficient": 0.005},
    "jumprelu": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity_coefficient": 0.005, "bandwidth": 0.05,
                 "threshold_init": 0.05},
    "jumprelu_tanh": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity": "tanh", "decoder_constraint": "none",
                      "pre_act_loss_coefficient": 0.01, "bandwidth": 0.05, "threshold_init": 0.05},
}
S = 20.0  # about sqrt(384): MiniLM's inputs under data.normalize=sqrt_d_model


def _at_scale(variant: str, s: float):
    torch.manual_seed(0)
    sae = build_sae({**VARIANTS[variant], "d_in": 16, "d_sae": 64})
    with torch.no_grad():  # biases off zero (deterministically), in units of the inputs
        for name in ("b_enc", "b_dec", "b_gate", "b_mag"):
            if hasattr(sae, name):
                getattr(sae, name).copy_(0.05 * torch.randn(getattr(sae, name).shape,
                                                            generator=torch.Generator().manual_seed(3)) * s)
    changed = sae.adapt_to_input_scale(s)
    x = s * torch.randn(256, 16, generator=torch.Generator().manual_seed(1)) / 4  # E||x||^2 = s^2
    out = sae.training_loss(x, {"sparsity": sae.cfg.sparsity_coefficient})
    return sae, x, out, changed


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_same_sae_on_scaled_inputs_behaves_the_same(variant):
    sae1, x1, out1, changed1 = _at_scale(variant, 1.0)
    sae_s, x_s, out_s, changed_s = _at_scale(variant, S)
    assert changed1 == {} and set(changed_s) == set(sae_s.cfg.scale_dependent())
    active1, active_s = out1.feature_acts > 0, out_s.feature_acts > 0
    assert active1.any() and torch.equal(active1, active_s)
    assert set(out1.terms) == set(out_s.terms)
    for name, term in out1.terms.items():  # every term keeps its weight against the reconstruction
        ratio1 = (term / out1.terms["rec"]).item()
        ratio_s = (out_s.terms[name] / out_s.terms["rec"]).item()
        assert ratio_s == pytest.approx(ratio1, rel=1e-3), name
    if variant.startswith("jumprelu"):  # the STE sees the same pre-activations in its window
        def window(sae, x):
            return ((sae.preacts(x) - sae.threshold).abs() < sae.cfg.bandwidth / 2)
        assert window(sae1, x1).any() and torch.equal(window(sae1, x1), window(sae_s, x_s))


def test_unit_mean_squared_norm_leaves_every_knob_as_given():
    sae = build_sae({**VARIANTS["jumprelu"], "d_in": 16, "d_sae": 64})
    before = dict(vars(sae.cfg))
    assert sae.adapt_to_input_scale(1.0) == {} and vars(sae.cfg) == before


@pytest.mark.slow
def test_sqrt_d_model_run_converts_and_logs_the_knobs(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """Through the CLI: under data.normalize=sqrt_d_model the inputs' rms is ~sqrt(d_in), and JumpReLU's knobs
    are converted by it (logged); under the default nothing is converted."""
    args = [*tiny_overrides(tiny_model_dir, tiny_corpus_dir, tmp_path / "out"), "sae=jumprelu",
            "data.train_tokens=2560", "eval.spliced_windows=0", "logger=none"]
    converted = run_cli([*args, "data.normalize=sqrt_d_model"])
    assert converted.returncode == 0, converted.stderr[-3000:]
    output = converted.stdout + converted.stderr
    lines = [line for line in output.splitlines() if "sae.bandwidth = 0.01" in line]
    assert len(lines) == 1 and "for data.normalize=sqrt_d_model" in lines[0], output[-3000:]
    rms = float(lines[0].rsplit("rms ", 1)[1].rstrip(")"))
    used = float(lines[0].split("-> ")[1].split()[0])
    assert 0.8 * 32**0.5 < rms < 1.5 * 32**0.5 and used == pytest.approx(0.01 * rms, rel=1e-3)
    default = run_cli(args)
    assert default.returncode == 0 and "(in units of E||x||^2 = 1)" not in default.stdout + default.stderr
