"""JumpReLU SAE: the straight-through estimators against the closed-form expected-loss gradient (SPEC
section 3), threshold positivity and precision, the decoder constraint, config validation and export."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import build_sae
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.saelens_format import export_sae, load_exported
from saelab.saes.ste import jumprelu, step

TARGET = "saelab.saes.jumprelu.JumpReLUSAE"


def make(**overrides) -> JumpReLUSAE:
    return build_sae({"_target_": TARGET, "d_in": 8, "d_sae": 16, **overrides})


def adam_steps(sae, batches, coefficient: float, lr: float) -> None:
    """Optimiser steps with the module's hooks around them (as SAEModule calls them)."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=sae.recipe_adam_betas)
    for x in batches:
        loss = sum(sae.training_loss(x, {"sparsity": coefficient}).terms.values())
        opt.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()


# -- the expected-loss test (SPEC section 3) ------------------------------------------------------------
LAMBDA = 1.0  # the threshold's fixed point is theta = sqrt(lambda) = 1


def half_normal_sample(n: int) -> torch.Tensor:
    """The n quantiles of a half-normal: a draw with no Monte-Carlo noise, so the test measures the STE."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2) * torch.special.erfinv(u)).float().unsqueeze(1)


def half_normal_density(t: float) -> float:
    return 2 * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def one_latent_sae(theta: float, kernel: str) -> JumpReLUSAE:
    """n = M = 1, W_enc = W_dec = 1, biases 0: L(x) = x^2 1[x <= theta] + lambda 1[x > theta]."""
    sae = build_sae({"_target_": TARGET, "d_in": 1, "d_sae": 1, "bandwidth": 0.01, "kernel": kernel,
                     "threshold_init": theta, "decoder_constraint": "none"})
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.W_dec.fill_(1.0)
    return sae


def sample_loss(sae: JumpReLUSAE, x: torch.Tensor) -> torch.Tensor:
    return sum(sae.training_loss(x, {"sparsity": LAMBDA}).terms.values())


@pytest.fixture(scope="module")
def x_half_normal() -> torch.Tensor:
    return half_normal_sample(1_000_000)


@pytest.mark.parametrize("kernel", ["rectangle", "triangle"])
@pytest.mark.parametrize("theta", [0.5, 0.9, 1.1, 1.5])
def test_ste_gradient_matches_the_expected_loss_gradient(x_half_normal, kernel, theta):
    expected = (theta**2 - LAMBDA) * half_normal_density(theta)
    sae = one_latent_sae(theta, kernel)
    sample_loss(sae, x_half_normal).backward()
    ste = sae.raw_threshold.grad.item()
    # A finite difference of the sample-average loss, with a step far wider than the sample spacing.
    h = 0.05
    with torch.no_grad():
        sae.raw_threshold.fill_(theta + h)
        up = sample_loss(sae, x_half_normal).item()
        sae.raw_threshold.fill_(theta - h)
        down = sample_loss(sae, x_half_normal).item()
    finite_difference = (up - down) / (2 * h)
    assert ste == pytest.approx(expected, rel=0.03)
    assert finite_difference == pytest.approx(expected, rel=0.03)
    # The sign flips at the fixed point theta^2 = lambda: below it the threshold is pushed up.
    assert math.copysign(1, ste) == math.copysign(1, theta - math.sqrt(LAMBDA))


# -- the estimators themselves ---------------------------------------------------------------------------
@pytest.mark.parametrize("ste_to_preacts", [False, True])
def test_ste_gradients(ste_to_preacts):
    eps, theta = 0.5, 0.8
    pre = torch.tensor([[0.0, 0.7, 0.85, 3.0]], requires_grad=True)  # below, inside, inside, far above
    threshold = torch.full((4,), theta, requires_grad=True)
    window = ((pre.detach() - theta).abs() < eps / 2).float() / eps  # K((pi - theta) / eps) / eps
    above = (pre.detach() > theta).float()

    grad_pre, grad_threshold = torch.autograd.grad(
        jumprelu(pre, threshold, eps, "rectangle", ste_to_preacts).sum(), [pre, threshold])
    torch.testing.assert_close(grad_pre, above + (theta * window if ste_to_preacts else 0.0))
    torch.testing.assert_close(grad_threshold, -theta * window[0])

    l0 = step(pre, threshold, eps, "rectangle", ste_to_preacts).sum()
    grad_pre, grad_threshold = torch.autograd.grad(l0, [pre, threshold], materialize_grads=True)
    torch.testing.assert_close(grad_pre, window if ste_to_preacts else torch.zeros_like(window))
    torch.testing.assert_close(grad_threshold, -window[0])


def test_l0_term_sends_no_gradient_to_the_preactivations_by_default():
    sae = make(bandwidth=1.0)
    x = torch.randn(64, 8)
    sparsity = sae.training_loss(x, {"sparsity": 1.0}).terms["sparsity"]
    grads = torch.autograd.grad(sparsity, [sae.W_enc, sae.b_enc, sae.raw_threshold], allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2].abs().sum() > 0
    sae = make(bandwidth=1.0, ste_to_preacts=True)
    sparsity = sae.training_loss(x, {"sparsity": 1.0}).terms["sparsity"]
    assert torch.autograd.grad(sparsity, sae.b_enc)[0].abs().sum() > 0


# -- threshold parameterisation and precision ----------------------------------------------------------
def test_raw_thresholds_stay_positive_when_pushed_down():
    # No sparsity pressure and a wide kernel: the reconstruction drives every threshold towards 0 and below.
    torch.manual_seed(0)
    sae = make(bandwidth=0.5, threshold_init=0.001)
    adam_steps(sae, [torch.randn(256, 8) for _ in range(5)], coefficient=0.0, lr=0.01)
    theta = sae.threshold.detach()
    assert (theta > 0).all()
    assert torch.isclose(theta, torch.tensor(sae.threshold_floor)).any()  # pushed down, held at the floor


def test_log_thresholds_are_positive_by_construction():
    sae = make(threshold_param="log", threshold_init=0.01)
    assert "log_threshold" in dict(sae.named_parameters())
    torch.testing.assert_close(sae.threshold.detach(), torch.full((16,), 0.01))


@pytest.mark.parametrize("threshold_param", ["raw", "log"])
def test_threshold_stays_float32_under_bf16_autocast(threshold_param):
    torch.manual_seed(0)
    sae = make(threshold_param=threshold_param, bandwidth=0.5)
    param = sae.raw_threshold if threshold_param == "raw" else sae.log_threshold
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=sae.recipe_adam_betas)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_loss(torch.randn(128, 8), {"sparsity": 0.01})
        loss = sum(out.terms.values())
    loss.backward()
    opt.step()
    sae.after_optimizer_step()
    assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
    assert sae.threshold.dtype == torch.float32
    assert param.grad.abs().sum() > 0


def test_threshold_comparison_is_made_in_float32():
    # 1.0078125 is a bf16 number; theta = 1.005 would round to it in bf16 and switch the latent off.
    pre = torch.tensor([[1.0078125]], dtype=torch.bfloat16, requires_grad=True)
    threshold = torch.tensor([1.005], requires_grad=True)
    f = jumprelu(pre, threshold, 0.01)
    assert f.dtype == torch.bfloat16 and f.item() == 1.0078125
    (grad_threshold,) = torch.autograd.grad(f.sum(), threshold)
    assert grad_threshold.dtype == torch.float32
    assert grad_threshold.item() == pytest.approx(-1.005 / 0.01)  # |pre - theta| < eps / 2: in the window


# -- decoder constraint ---------------------------------------------------------------------------------
def test_decoder_rows_stay_unit_norm_after_optimiser_steps():
    torch.manual_seed(0)
    sae = make(bandwidth=0.1)
    adam_steps(sae, [torch.randn(128, 8) for _ in range(5)], coefficient=0.01, lr=0.05)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)


# -- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("bandwidth", 0.0), ("bandwidth", -1.0), ("kernel", "gaussian"), ("threshold_init", 0.0),
    ("threshold_param", "softplus"), ("sparsity", "l1"), ("ste_to_preacts", "yes"),
    ("pre_act_loss_coefficient", -1e-6), ("tanh_scale", 0.0), ("threshold_pace", 0.0),
    ("threshold_init_density", 1.0), ("threshold_units", "encoder_norm"),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"sae.{field}="):
        make(**{field: value})


def test_tanh_sparsity_and_pre_act_loss_are_terms():
    sae = make(sparsity="tanh", pre_act_loss_coefficient=3e-6, decoder_constraint="none")
    terms = sae.training_loss(torch.randn(32, 8), {"sparsity": 0.1}).terms
    assert set(terms) == {"rec", "sparsity", "pre_act"}
    sum(terms.values()).backward()
    assert sae.raw_threshold.grad is not None


# -- export ----------------------------------------------------------------------------------------------
def test_export_reproduces_reconstructions_on_raw_activations(tmp_path):
    torch.manual_seed(0)
    sae = make(bandwidth=0.1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.raw_threshold.uniform_(0.05, 0.5)
    scale = 3.7
    exported = load_exported(export_sae(sae, scale, tmp_path / "sae", {}))
    assert exported.cfg["architecture"] == "jumprelu"
    x_raw = scale * (torch.randn(256, 8) + 0.3)
    with torch.no_grad():
        expected = scale * sae(x_raw / scale)
        assert 0 < (sae.encode(x_raw / scale) > 0).float().mean() < 1  # some latents on, some off
        torch.testing.assert_close(exported(x_raw), expected, atol=1e-4, rtol=1e-4)


# -- sae.threshold_init_density: thresholds from the first training batch ----------------------------------
@pytest.mark.parametrize("threshold_param", ["raw", "log"])
def test_the_first_batch_sets_each_threshold_so_the_latent_fires_on_that_fraction(threshold_param):
    """theta_i = the (1 - density) quantile of latent i's pre-activations on the first batch: on that batch each
    latent fires on density x B tokens, so L0 starts at density x d_sae whatever the encoder's initial scale."""
    torch.manual_seed(0)
    sae = make(d_sae=32, decoder_init_norm=0.01, threshold_init_density=0.25, threshold_param=threshold_param)
    x = torch.randn(400, 8)
    before = sae.threshold.clone()
    sae.training_loss(x, {"sparsity": 0.0})
    pre = sae.preacts(x).detach()
    fired = (pre > sae.threshold).float()
    counts = fired.sum(0)  # 0.25 x 400 per latent, every latent (log: exp(log theta) may round by one token)
    assert ((counts - 100).abs() <= (0 if threshold_param == "raw" else 1)).all(), counts
    assert (pre > 0).float().mean() > 0.3 and not torch.equal(sae.threshold, before)
    assert fired.sum(1).mean().item() == pytest.approx(0.25 * 32, abs=32 / 400)


def test_the_thresholds_are_set_once_and_a_checkpoint_remembers_it():
    torch.manual_seed(0)
    sae = make(threshold_init_density=0.5)
    x = torch.randn(64, 8)
    sae.training_loss(x, {"sparsity": 0.0})
    calibrated = sae.threshold.clone()
    sae.training_loss(10 * x, {"sparsity": 0.0})  # a later batch of another scale changes nothing
    assert torch.equal(sae.threshold, calibrated)
    resumed = make(threshold_init_density=0.5)
    resumed.load_state_dict(sae.state_dict())
    resumed.training_loss(10 * x, {"sparsity": 0.0})
    assert torch.equal(resumed.threshold, calibrated)  # resuming does not set them again
    fresh = make(threshold_init_density=0.5)
    fresh.training_loss(10 * x, {"sparsity": 0.0})
    assert not torch.allclose(fresh.threshold, calibrated)


def test_only_the_l0_count_takes_a_negative_coefficient():
    """l0_control.signed's recipe (null): a negative L0 coefficient lowers thresholds; a negative tanh or L1
    penalty would reward unbounded activations."""
    assert make(sparsity="l0").signed_sparsity_coefficient is True
    assert make(sparsity="tanh", decoder_constraint="none").signed_sparsity_coefficient is False
    from saelab.saes.relu import ReluSAE

    assert ReluSAE(ReluSAE.Config(d_in=8, d_sae=16)).signed_sparsity_coefficient is False


def test_a_negative_l0_coefficient_pulls_the_thresholds_down():
    """The STE gradient of lambda sum_i H(pi_i - theta_i) in theta is -lambda/eps K(...) (SPEC section 3): with
    lambda < 0 gradient descent lowers theta where pre-activations sit within the bandwidth of it."""
    torch.manual_seed(0)
    sae = make(bandwidth=0.5, threshold_init=0.3)
    x = torch.randn(256, 8)
    before = sae.threshold.clone()
    adam_steps(sae, [x] * 5, coefficient=-1.0, lr=1e-2)
    assert (sae.threshold < before).float().mean() > 0.9


@pytest.mark.parametrize("threshold_param", ["raw", "log"])
def test_threshold_pace_scales_how_far_adam_moves_theta_in_a_step(threshold_param):
    """Adam's first step moves every parameter with a nonzero gradient by lr (bias-corrected m / sqrt(v) = sign g
    with beta1 0); theta = pace x raw then moves by pace x lr (and log theta by pace x lr), with theta itself
    unchanged at init."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    moved = {}
    for pace in (1.0, 4.0):
        torch.manual_seed(1)
        sae = make(bandwidth=0.5, threshold_init=0.3, threshold_pace=pace, threshold_param=threshold_param)
        assert torch.allclose(sae.threshold, torch.full((16,), 0.3))
        before = sae.threshold.clone()
        adam_steps(sae, [x], coefficient=1.0, lr=1e-3)
        after = sae.threshold
        moved[pace] = (after - before) if threshold_param == "raw" else (after.log() - before.log())
    active = moved[1.0].abs() > 1e-6
    assert active.sum() > 8
    assert torch.allclose(moved[1.0][active].abs(), torch.full_like(moved[1.0][active], 1e-3), rtol=1e-2)
    assert torch.allclose(moved[4.0][active], 4 * moved[1.0][active], rtol=1e-2)


# -- sae.threshold_units=encoder_gain: theta_i = t_i (w_i . d_i / ||d_i||) ---------------------------------
def test_encoder_gain_thresholds_grow_with_the_encoder():
    """Scaling latent i's encoder column and bias by c scales pi_i by c, and its gain along d_i by c: theta_i
    scales too, so the same tokens fire and f_i scales by c. An absolute threshold stays put and lets more
    tokens through."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    fired = {}
    for units in ("encoder_gain", "absolute"):
        torch.manual_seed(1)
        sae = make(threshold_init=0.3, threshold_units=units)
        with torch.no_grad():
            f = sae.encode(x)
            sae.W_enc.mul_(3.0)
            sae.b_enc.mul_(3.0)
            fired[units] = ((f > 0).sum().item(), (sae.encode(x) > 0).sum().item())
            if units == "encoder_gain":
                torch.testing.assert_close(sae.encode(x), 3.0 * f)
    assert fired["encoder_gain"][0] == fired["encoder_gain"][1] > 0
    assert fired["absolute"][1] > fired["absolute"][0]


def test_encoder_gain_ignores_what_the_encoder_gains_off_the_latent_s_direction():
    """g_i = w_i . d_i / ||d_i||: adding to w_i a vector orthogonal to d_i leaves theta_i where it was; moving w_i
    along d_i moves it by the same fraction. A transcoder's unit is ||w_i|| (its decoder writes another space)."""
    torch.manual_seed(0)
    sae = make(threshold_init=0.3, threshold_units="encoder_gain", decoder_init_norm=0.1)
    torch.testing.assert_close(sae.threshold, torch.full((16,), 0.3))  # tied init: g_i = ||d_i|| = 0.1
    d = sae.W_dec.detach()[0]
    off = torch.randn(8)
    off -= (off @ d) / (d @ d) * d
    with torch.no_grad():
        sae.W_enc[:, 0] += off
        torch.testing.assert_close(sae.threshold[0], torch.tensor(0.3))
        sae.W_enc[:, 1] += sae.W_dec[1]  # tied init: w_1 = d_1, so w_1 becomes 2 d_1 and its gain doubles
    torch.testing.assert_close(sae.threshold[1], torch.tensor(0.6))
    transcoder = make(threshold_init=0.3, threshold_units="encoder_gain", d_out=4)
    with torch.no_grad():
        transcoder.W_enc[:, 0] *= 2.0
    torch.testing.assert_close(transcoder.threshold[:2], torch.tensor([0.6, 0.3]))


def test_encoder_gain_thresholds_start_where_asked_and_export_in_absolute_units(tmp_path):
    """The first batch's quantiles are absolute thresholds whatever unit they are stored in; the export
    (SAELens's layout, absolute thresholds) computes what the SAE does."""
    torch.manual_seed(0)
    sae = make(threshold_init_density=0.25, threshold_units="encoder_gain", decoder_init_norm=0.1)
    x = torch.randn(400, 8)
    sae.training_loss(x, {"sparsity": 0.0})
    counts = (sae.encode(x) > 0).sum(0)
    assert ((counts - 100).abs() <= 1).all(), counts
    exported = load_exported(export_sae(sae, 2.0, tmp_path / "sae", {}))
    with torch.no_grad():
        torch.testing.assert_close(exported(2.0 * x), 2.0 * sae(x), atol=1e-4, rtol=1e-4)
    tensors = dict(reversed(sae.exported_tensors(2.0, None).items()))  # the threshold first: read after the weights
    assert next(iter(tensors)) == "threshold"
    imported = make(threshold_units="encoder_gain", decoder_init_norm=1.0)
    imported.import_tensors(tensors, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), sae(x), atol=1e-5, rtol=1e-5)
