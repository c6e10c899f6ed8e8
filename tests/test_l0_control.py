"""sae.target_l0's controller (run/l0_control.py): its target schedule, its error, and proportional-integral
control of log lambda, checked against the formulas in its docstring."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.run.l0_control import GAIN_BOUNDS, L0ControlConfig, L0Controller

CFG = L0ControlConfig(ramp_fraction=0.5, proportional=2.0, integral=0.05)


def test_the_target_eases_from_the_first_l0_to_the_target_along_a_half_cosine_in_log_l0():
    ctl = L0Controller(8.0, CFG, start_step=10, max_steps=100)  # ramp: steps 10 .. 60
    ctl.update(torch.tensor(800.0), step=10)  # the first controlled batch: the dense start
    for step in (10, 20, 35, 50, 60, 90):
        s = min((step - 10) / 50, 1.0)
        expected = math.exp(math.log(8) + math.log(800 / 8) * 0.5 * (1 + math.cos(math.pi * s)))
        assert ctl.target_at(step).item() == pytest.approx(expected, rel=1e-9), step


def test_nothing_moves_before_the_coefficients_warm_up_ends():
    ctl = L0Controller(8.0, CFG, start_step=5, max_steps=100)
    for step in range(5):
        ctl.update(torch.tensor(500.0), step)
    assert ctl.gain.item() == 1.0 and ctl.start_l0.item() == 0.0


def test_pi_control_of_log_lambda_on_the_log_error():
    """Above the target (no ramp): I += k_i e and log g = I + k_p e with e = log(L0 / target) clipped to 1."""
    ctl = L0Controller(10.0, L0ControlConfig(ramp_fraction=0.0, proportional=2.0, integral=0.05), 0, 100)
    integral = 0.0
    for step, l0 in enumerate([12.0, 11.0, 9.0, 30.0, 10.0]):
        ctl.update(torch.tensor(l0), step)
        error = max(-1.0, min(1.0, math.log(l0 / 10.0)))
        integral += 0.05 * error
        assert ctl.gain.item() == pytest.approx(math.exp(integral + 2.0 * error), rel=1e-9), step
        assert ctl.error.item() == pytest.approx(error, rel=1e-9)


def test_between_the_ramp_and_the_target_nothing_pushes():
    """L0 falling faster than the ramp, but still above the target, leaves lambda where it is; above the ramp it
    rises, below the target it falls."""
    ctl = L0Controller(8.0, CFG, start_step=0, max_steps=100)
    ctl.update(torch.tensor(1000.0), 0)  # the ramp starts at 1000: error 0
    assert ctl.gain.item() == pytest.approx(1.0)
    ctl.update(torch.tensor(50.0), 1)  # far below the ramp (~999 at step 1) but above 8
    assert ctl.gain.item() == pytest.approx(1.0) and ctl.error.item() == 0.0
    ramp = ctl.target_at(2).item()
    ctl.update(torch.tensor(ramp * 1.2), 2)
    assert ctl.error.item() == pytest.approx(math.log(1.2)) and ctl.gain.item() > 1.0
    ctl.update(torch.tensor(4.0), 3)
    assert ctl.error.item() == pytest.approx(math.log(0.5)) and ctl.gain.item() < 1.0


def test_the_integral_holds_while_l0_heads_for_the_target_fast_enough():
    """hold_horizon h (the docstring's conditional integration): with m_t the EMA (0.9) of log L0 and s_t the EMA
    (0.9) of its per-step change, the integral is held when e_t s_t < 0 and |s_t| h max_steps > |e_t|, else
    I += k_i e_t. A fast fall towards the target is held, a slow drift above it and a fall through it are not."""
    cfg = L0ControlConfig(ramp_fraction=0.0, proportional=0.0, integral=0.1, hold_horizon=0.2)
    ctl = L0Controller(10.0, cfg, 0, 100)  # held while L0 would reach 10 within 20 steps at its current pace
    l0s = [40.0 * 0.9 ** t for t in range(20)] + [30.0 * 0.999 ** t for t in range(40)]
    m = s = None
    integral, held = 0.0, []
    for step, l0 in enumerate(l0s):
        ctl.update(torch.tensor(l0), step)
        previous = math.log(l0) if m is None else m
        m = 0.9 * previous + 0.1 * math.log(l0)
        s = 0.9 * (s or 0.0) + 0.1 * (m - previous)
        error = max(-1.0, min(1.0, math.log(l0 / 10.0)))
        hold = error * s < 0 and abs(s) * 20 > abs(error)
        held.append(hold)
        integral += 0.0 if hold else 0.1 * error
        assert ctl.accumulated.item() == pytest.approx(integral, rel=1e-6), step
    assert any(held[:14]) and not all(held[:14])  # the fast fall: held once its pace is known
    assert not any(held[14:20])  # below the target: falling away from it
    assert not any(held[-10:])  # a slow drift above the target: integrated


def test_without_the_hold_the_integral_always_integrates():
    ctl = L0Controller(10.0, L0ControlConfig(ramp_fraction=0.0, proportional=0.0, integral=0.1), 0, 100)
    for step, l0 in enumerate(40.0 * 0.9 ** t for t in range(10)):
        ctl.update(torch.tensor(l0), step)
    expected = sum(0.1 * min(1.0, math.log(40.0 * 0.9 ** t / 10.0)) for t in range(10))
    assert ctl.accumulated.item() == pytest.approx(expected, rel=1e-6)


def test_the_integral_is_clamped_to_the_gains_bounds():
    ctl = L0Controller(1.0, L0ControlConfig(ramp_fraction=0.0, proportional=0.0, integral=1.0), 0, 100)
    for step in range(50):
        ctl.update(torch.tensor(1000.0), step)
    assert ctl.gain.item() == pytest.approx(GAIN_BOUNDS[1])
    ctl.update(torch.tensor(0.5), 50)  # the first step back down moves it at once: no wound-up integral
    assert ctl.gain.item() == pytest.approx(GAIN_BOUNDS[1] * math.exp(math.log(0.5)), rel=1e-9)


def test_a_signed_gain_is_the_sinh_of_the_shifted_log_gain_and_turns_negative_below_the_target():
    """signed: g = sinh(u + asinh 1) of the log-gain u = I + k_p e (module docstring): 1 at u = 0, ~exp(u) far
    above, negative once u < -asinh 1."""
    cfg = L0ControlConfig(ramp_fraction=0.0, proportional=2.0, integral=0.1, signed=True)
    ctl = L0Controller(10.0, cfg, 0, 100)
    integral = 0.0
    for step, l0 in enumerate([10.0, 30.0, 4.0, 4.0, 5.0]):
        ctl.update(torch.tensor(l0), step)
        error = max(-1.0, min(1.0, math.log(l0 / 10.0)))
        integral += 0.1 * error
        expected = math.sinh(integral + 2.0 * error + math.asinh(1.0))
        assert ctl.gain.item() == pytest.approx(expected, rel=1e-9), step
    assert ctl.gain.item() < 0  # below the target the coefficient rewards firing
    unsigned = L0Controller(10.0, L0ControlConfig(ramp_fraction=0.0, proportional=2.0, integral=0.1), 0, 100)
    for step, l0 in enumerate([10.0, 30.0, 4.0, 4.0, 5.0]):
        unsigned.update(torch.tensor(l0), step)
    assert unsigned.gain.item() > 0


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("ramp_fraction", 1.0, r"a fraction in \[0, 1\)"), ("integral", 0, "positive"),
    ("proportional", -1, ""), ("hold_horizon", -0.1, ""),
    ("gain", 1, "a field of hold_horizon, integral, proportional, ramp_fraction, signed")])
def test_bad_settings_name_the_field(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"l0_control\.{field}={value}.*{allowed}"):
        L0ControlConfig.from_config({field: value})


@pytest.mark.parametrize(("sae_cfg", "expected"), [
    ({"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity": "l0"}, True),
    ({"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "sparsity": "tanh", "decoder_constraint": "none"}, False),
    ({"_target_": "saelab.saes.relu.ReluSAE"}, False)])
def test_signed_null_is_on_only_where_the_variant_takes_a_negative_coefficient(sae_cfg, expected):
    """l0_control.signed=null: the member's controller is signed for JumpReLU's L0 count only; false stays
    unsigned for every variant."""
    from saelab.run.member import SAEMember
    from saelab.saes.base import build_sae

    for signed, want in ((None, expected), (False, False)):
        sae = build_sae({**sae_cfg, "d_in": 8, "d_sae": 16, "target_l0": 4})
        member = SAEMember(sae, {"lr": 1e-3}, max_steps=10, dead_window_tokens=10**9, l0_control={"signed": signed})
        assert member.l0_controller is not None and member.l0_controller.cfg.signed is want
