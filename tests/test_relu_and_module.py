"""The ReLU SAE, the generic module (decoder constraint, schedules) and the SAELens export."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.run.member import lr_factor
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from saelab.saes.saelens_format import export_sae, load_exported
from tests.conftest import optim_config


def relu_sae(**overrides):
    cfg = {"_target_": "saelab.saes.relu.ReluSAE", "d_in": 16, "d_sae": 64, "sparsity_coefficient": 0.01}
    return build_sae(cfg | overrides)


def test_initialisation_unit_norm_decoder_tied_encoder_zero_biases():
    torch.manual_seed(0)
    sae = relu_sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # tied at init, trained untied
    assert torch.allclose(relu_sae(decoder_init_norm=0.1).W_dec.norm(dim=1), torch.full((64,), 0.1))


def test_width_from_expansion_factor_and_unknown_fields_rejected():
    cfg = {"_target_": "saelab.saes.relu.ReluSAE", "d_in": 16, "expansion_factor": 4}
    assert build_sae(cfg).d_sae == 64
    with pytest.raises(ConfigError, match="sae.bandwidth"):
        build_sae(cfg | {"bandwidth": 0.1})
    with pytest.raises(ConfigError, match="sae.sparsity='l0'"):
        build_sae(cfg | {"sparsity": "l0"})
    with pytest.raises(ConfigError, match="sae._target_"):
        build_sae(cfg | {"_target_": "saelab.saes.nope.Nope"})


def _train_steps(sae, n_steps=5, lr=1e-2):
    module = SAEModule.single(sae, optim_config(lr=lr, betas=None, lr_warmup_steps=0, lr_decay_fraction=0.0),
                              max_steps=100, dead_window_tokens=1000)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(n_steps):
        out = sae.training_loss(torch.randn(32, 16), module.member.coefficients())
        optimizer.zero_grad()
        sum(out.terms.values()).backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        sae.after_optimizer_step()
    return sae


def test_unit_norm_decoder_constraint_holds_after_steps():
    torch.manual_seed(0)
    sae = _train_steps(relu_sae())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    free = _train_steps(relu_sae(decoder_constraint="none", decoder_init_norm=0.1), lr=5e-2)
    assert not torch.allclose(free.W_dec.norm(dim=1), torch.full((64,), 0.1), atol=1e-4)


def test_parallel_gradient_component_is_removed():
    sae = relu_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_ri_l1_penalty_weights_latents_by_decoder_norm():
    torch.manual_seed(0)
    sae = relu_sae(sparsity="ri_l1", decoder_constraint="none")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    x = torch.randn(8, 16)
    f = sae.encode(x)
    out = sae.training_loss(x, {"sparsity": 1.0})
    assert out.terms["sparsity"].item() == pytest.approx(3.0 * f.sum(-1).mean().item(), rel=1e-5)


def test_sparsity_coefficient_warms_up_linearly():
    sae = relu_sae(sparsity_warmup_steps=10, sparsity_coefficient=0.5)
    module = SAEModule.single(sae, {}, max_steps=100, dead_window_tokens=10)
    assert module.member.coefficients()["sparsity"] == pytest.approx(0.05)


def test_lr_schedule_warmup_and_final_decay():
    assert lr_factor(0, 100, 10, "linear", 0.2) == pytest.approx(0.1)
    assert lr_factor(5, 100, 10, "linear", 0.2) == pytest.approx(0.55)
    assert lr_factor(50, 100, 10, "linear", 0.2) == 1.0
    assert lr_factor(90, 100, 10, "linear", 0.2) == pytest.approx(0.5)
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)


def test_dead_latent_bookkeeping():
    sae = relu_sae()
    f = torch.zeros(10, 64)
    f[:, :5] = 1.0
    sae.record_fired((f > 0).any(0), len(f))
    sae.record_fired(torch.zeros(64, dtype=torch.bool), 10)
    dead = sae.dead_mask(window_tokens=15)
    assert not dead[:5].any() and dead[5:].all()
    assert not sae.dead_mask(window_tokens=1000).any()  # a window has not passed yet: nothing is dead
    sae.record_fired(torch.zeros(64, dtype=torch.bool), 980)  # 1000 tokens without latents 5.., 990 without 0-4
    assert not sae.dead_mask(window_tokens=1000)[:5].any() and sae.dead_mask(window_tokens=1000)[5:].all()


def test_export_takes_raw_activations(tmp_path):
    torch.manual_seed(0)
    sae = relu_sae()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    scale = 7.5
    export_sae(sae, scale, tmp_path, {"hook_name": "h"})
    exported = load_exported(tmp_path)
    x_raw = torch.randn(20, 16) * scale
    assert torch.allclose(exported(x_raw), scale * sae(x_raw / scale), atol=1e-4)
    assert torch.allclose(exported.encode(x_raw), scale * sae.encode(x_raw / scale), atol=1e-4)
    assert exported.cfg["architecture"] == "standard" and exported.cfg["metadata"]["hook_name"] == "h"


@pytest.mark.parametrize(("target", "field"), [("gated.GatedSAE", "r_mag"), ("gated.GatedSAE", "tie_encoder"),
                                               ("jumprelu.JumpReLUSAE", "ste_to_preacts")])
def test_boolean_switches_reject_non_booleans(target, field):
    cfg = {"_target_": f"saelab.saes.{target}", "d_in": 16, "d_sae": 64, field: "yes"}
    with pytest.raises(ConfigError, match=rf"sae.{field}='yes' is not allowed: expected true or false"):
        build_sae(cfg)


@pytest.mark.parametrize("fused", [True, False])
def test_training_optimiser_is_fused_adam_unless_switched_off(fused):
    """optim.fused (default true) picks torch's fused Adam kernel; both give the same update."""
    torch.manual_seed(0)
    sae = relu_sae(d_in=8, d_sae=16)
    cfg = optim_config(lr=1e-2, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)
    module = SAEModule.single(sae, cfg | {"fused": fused}, max_steps=10, dead_window_tokens=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is fused
    reference = torch.optim.Adam([p.detach().clone().requires_grad_() for p in sae.parameters()], lr=1e-2,
                                 betas=sae.recipe_adam_betas)
    for p, q in zip(sae.parameters(), reference.param_groups[0]["params"], strict=True):
        p.grad = q.grad = torch.randn_like(p)
    optimizer.step()
    reference.step()
    for p, q in zip(sae.parameters(), reference.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), q.detach())


def test_training_logs_only_on_logging_steps(monkeypatch, tmp_path):
    """Logging has a cost, so a training step logs only when the loggers will write (every log_every_n_steps):
    the member's loggers get the loss, tok/s and the step metrics, the progress bar the loss and tok/s."""
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = SAEModule.single(relu_sae(), optim_config(lr=1e-3, betas=None, lr_warmup_steps=0, lr_decay_fraction=0.0),
                              max_steps=20, dead_window_tokens=1000)
    logged_at: dict[int, set[str]] = {}
    bar_at: dict[int, set[str]] = {}

    def spy_member(metrics, step):
        logged_at.setdefault(step, set()).update(metrics)

    def spy_step(*args, **kwargs):
        before = dict(module.progress)
        result = step(*args, **kwargs)
        if module.progress != before:
            bar_at.setdefault(module.global_step, set()).update(module.progress)
        return result

    step = module.training_step
    monkeypatch.setattr(module.member, "log_metrics", spy_member)
    monkeypatch.setattr(module, "training_step", spy_step)
    trainer = L.Trainer(max_steps=20, log_every_n_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(torch.randn(20 * 8, 16), batch_size=8))
    assert sorted(logged_at) == [9, 19] and sorted(bar_at) == [9, 19]  # steps 10 and 20 (9 and 19 done before)
    assert {"loss", "tok/s", "loss/rec", "train/fvu", "train/l0", "lr"} <= logged_at[19]
    assert bar_at[19] == {"loss", "tok/s"}
