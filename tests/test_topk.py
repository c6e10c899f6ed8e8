"""TopK and BatchTopK SAEs: exact sparsity, the batch-level vs per-token encoder, AuxK's gradient path,
export with the normalisation scale folded in, config validation, and a real learning check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from saelab.errors import ConfigError
from saelab.metrics.evaluate import evaluate_sae
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from saelab.saes.saelens_format import export_sae, load_exported
from tests.conftest import optim_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

TARGETS = {"topk": "saelab.saes.topk.TopKSAE", "batchtopk": "saelab.saes.batchtopk.BatchTopKSAE",
           "matryoshka": "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE"}


def make_sae(variant: str = "topk", **overrides):
    cfg = {"_target_": TARGETS[variant], "d_in": 16, "d_sae": 64, "k": 4}
    return build_sae(cfg | overrides)


def positive_preacts(sae) -> None:
    """A large encoder bias makes every pre-activation positive, so ReLU cannot leave fewer than k."""
    with torch.no_grad():
        sae.b_enc.fill_(100.0)


def test_topk_has_exactly_k_active_latents_per_token():
    torch.manual_seed(0)
    sae = make_sae()
    x = torch.randn(32, 16)
    assert ((sae.encode(x) > 0).sum(-1) <= 4).all()  # in general: at most k (ReLU may drop some)
    positive_preacts(sae)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) == 4).all()
    pre = sae.pre_activations(x)
    assert torch.equal(f, torch.where(pre >= pre.topk(4, dim=-1).values[:, -1:], pre, 0))  # the k largest
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec, atol=1e-5)  # sparse decode == dense decode
    out = sae.training_loss(x, {})
    # The same latents; the values equal up to float32 rounding (the bf16 screen recomputes them as dot products).
    assert torch.equal(out.feature_acts > 0, f > 0) and set(out.terms) == {"rec", "auxk"}
    torch.testing.assert_close(out.feature_acts, f, rtol=1e-6, atol=1e-6)
    assert sae.scheduled_coefficients == {}


def test_batchtopk_keeps_batch_times_k_in_training_and_thresholds_per_token_in_eval():
    torch.manual_seed(0)
    sae = make_sae("batchtopk")
    positive_preacts(sae)
    x = torch.randn(32, 16)
    f = sae.encode(x)  # training mode: one top-(B k) over the whole batch
    assert int((f > 0).sum()) == 32 * 4
    assert (f > 0).sum(-1).float().std() > 0  # tokens do not each get exactly k
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec, atol=1e-4)
    x_loud = torch.cat([x[:1], 100 * x[1:]])
    assert not torch.equal(sae.encode(x_loud)[0], f[0])  # in training a token's latents depend on its batch

    sae.training_loss(x, {})  # sets the threshold from this batch's smallest kept activation
    assert sae.threshold.item() == pytest.approx(f[f > 0].min().item())
    sae.eval()
    pre = sae.pre_activations(x)
    f_eval = sae.encode(x)
    assert torch.equal(f_eval, pre * (pre > sae.threshold))  # per-token JumpReLU at the global threshold
    assert torch.equal(sae.encode(x_loud)[0], f_eval[0])  # other tokens no longer matter
    assert torch.allclose(sae(x), f_eval @ sae.W_dec + sae.b_dec, atol=1e-4)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_batchtopk_selection_is_exact_with_and_without_the_threshold_shortcut(kernels, monkeypatch):
    """The native kernel ignores theta (it samples its own cutoff); the torch fallback's theta shortcut is exact
    whether theta lets many, just enough or too few entries through."""
    from saelab.kernels import native

    if kernels == "torch":
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    torch.manual_seed(0)
    sae = make_sae("batchtopk")
    pre = torch.randn(32, 64)
    exact = pre.flatten().topk(32 * 4).indices.sort().values
    sae.threshold_batches.fill_(1)
    for threshold in (0.0, 1.0, 1.5, 3.0, 100.0):  # shortcut (many or just enough candidates), fallback
        sae.threshold.fill_(threshold)
        ids, values = sae.batch_topk(pre)
        assert torch.equal(ids, exact) and torch.equal(values, pre.flatten()[exact])
        bias = torch.randn(64)
        ids, values = sae.batch_topk(pre, bias)
        with_bias = (pre + bias).flatten()
        assert torch.equal(ids, with_bias.topk(32 * 4).indices.sort().values) and torch.equal(values, with_bias[ids])


@pytest.mark.parametrize(("width", "k", "prefiltered"), [(3072, 32, True), (64, 4, True), (256, 32, False),
                                                      (60, 4, False)])
@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_per_token_topk_equals_torch_topk(width, k, prefiltered, kernels, monkeypatch):
    """The native kernel, and without it the grouped prefilter (used when width is a multiple of 8 with at
    least 2k groups), are exact, also when one group holds several of a row's top entries."""
    from saelab.kernels import native
    from saelab.saes import topk as topk_module

    if kernels == "torch":
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    torch.manual_seed(0)
    scores = torch.randn(50, width)
    n_groups = width // 8
    scores[0, torch.arange(8) * n_groups + 3] += 10.0  # row 0: a whole group among its top k
    group_max_calls, native_calls = [], []
    original_amax, original_row_topk = torch.Tensor.amax, native.row_topk

    def spy(self, *args, **kwargs):
        group_max_calls.append(self.shape)
        return original_amax(self, *args, **kwargs)

    def native_spy(*args, **kwargs):
        result = original_row_topk(*args, **kwargs)
        native_calls.append(result is not None)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "amax", spy)
        patch.setattr(native, "row_topk", native_spy)
        rows, ids, values = topk_module.per_token_topk(scores, k)
    assert native_calls == [kernels == "native"]
    assert bool(group_max_calls) == (prefiltered and kernels == "torch")
    reference = scores.topk(k, dim=-1)
    assert torch.equal(rows, torch.arange(50).repeat_interleave(k))
    got = ids.view(50, k).sort(-1).values
    assert torch.equal(got, reference.indices.sort(-1).values)
    assert torch.equal(values.view(50, k).sort(-1).values, reference.values.sort(-1).values)
    assert torch.equal(scores.gather(1, ids.view(50, k)), values.view(50, k))


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_kept_activation():
    torch.manual_seed(0)
    sae = make_sae("batchtopk", threshold_ema_decay=0.75)
    minima = []
    for _ in range(3):
        out = sae.training_loss(torch.randn(32, 16), {})
        minima.append(out.feature_acts[out.feature_acts > 0].min().item())
    expected = (0.75 * minima[0] + 0.25 * minima[1]) * 0.75 + 0.25 * minima[2]  # decay 0 on the first batch
    assert sae.threshold.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_auxk_trains_only_dead_latents(variant):
    torch.manual_seed(0)
    sae = make_sae(variant, dead_window_tokens=1000)  # k_aux = d_in // 2 = 8 > 5 dead: uses all 5, scaled by 5/8
    dead = torch.tensor([3, 10, 20, 41, 63])
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    x = torch.randn(32, 16)
    assert sae.training_loss(x, {}).terms["auxk"].item() == 0.0  # nothing dead yet

    sae.tokens_seen.fill_(5000)
    sae.tokens_since_fired[dead] = 5000
    with torch.no_grad():
        sae.b_dec.normal_()  # so the residual is not centred by construction
    out = sae.training_loss(x, {})
    assert out.extras["dead_latents"].item() == 5
    out.terms["auxk"].backward()
    assert sae.W_dec.grad[live].abs().max() == 0 and sae.W_enc.grad[:, live].abs().max() == 0
    assert sae.b_enc.grad[live].abs().max() == 0
    assert (sae.W_dec.grad[dead].norm(dim=1) > 0).all() and (sae.W_enc.grad[:, dead].norm(dim=0) > 0).all()
    if variant == "matryoshka":
        return  # AuxK per level: its value is checked in tests/test_matryoshka.py

    # Gao et al.'s alpha * ||e - W_dec z_aux||^2 / ||e - mean e||^2 (e the detached main residual), on the scale
    # of saelab's unnormalised L_rec: times E_b ||x - mean x||^2.
    with torch.no_grad():
        pre = sae.pre_activations(x)
        e = x - sae(x)
        z_aux = torch.zeros_like(pre)
        z_aux[:, dead] = pre[:, dead]  # min(k_aux, n_dead) = all 5 dead latents, raw pre-activations
        expected = (e - z_aux @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum() / 32
        expected *= (x - x.mean(0)).pow(2).sum(-1).mean() * 5 / 8  # min(n_dead / k_aux, 1)
    assert out.terms["auxk"].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_auxk_weight_against_reconstruction_does_not_depend_on_the_input_scale(variant):
    """Gao et al. add two normalised MSEs, so L_auxk / L_rec is scale-free: the same SAE on inputs scaled by s
    (biases scaled by s too, so every latent and residual scales by s) gives the same ratio. Normalising AuxK
    alone made it fall by s^2 (from 0.130 to 0.0041 at s = sqrt(32)), which switched AuxK off under
    data.normalize=sqrt_d_model."""
    ratios = []
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for s in (1.0, 32**0.5):
        torch.manual_seed(0)
        sae = make_sae(variant, dead_window_tokens=100)
        sae.tokens_since_fired[::2] = 100  # half the latents dead
        with torch.no_grad():
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(2)).mul_(s)
            sae.b_enc.mul_(s)
        terms = sae.training_loss(s * x, {}).terms
        ratios.append((terms["auxk"] / terms["rec"]).item())
    assert ratios[0] > 0
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-3)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_export_reproduces_reconstructions_on_raw_activations(variant, tmp_path):
    torch.manual_seed(0)
    sae = make_sae(variant)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3)
        sae.b_dec.normal_()
    if variant != "topk":
        sae.threshold.fill_(0.4)
    sae.eval()
    scale = 7.5
    x_raw = scale * torch.randn(64, 16)
    exported = load_exported(export_sae(sae, scale, tmp_path / "sae", {}))
    assert exported.cfg["architecture"] == ("topk" if variant == "topk" else "jumprelu")
    if variant == "topk":
        assert exported.cfg["k"] == 4
    else:
        assert torch.allclose(exported.threshold, torch.full((64,), 0.4 * scale))
    with torch.no_grad():
        expected = scale * sae(x_raw / scale)
        assert torch.allclose(exported(x_raw), expected, atol=1e-4)
        assert torch.allclose(exported.encode(x_raw), scale * sae.encode(x_raw / scale), atol=1e-4)
        assert 0 < (sae.encode(x_raw / scale) > 0).sum(-1).float().mean() < 64  # neither empty nor dense


def test_config_validation():
    with pytest.raises(ConfigError, match="sae.k"):
        make_sae(k=65)
    with pytest.raises(ConfigError, match="sae.k"):
        make_sae("batchtopk", k=0)
    with pytest.raises(ConfigError, match="sae.sparsity_coefficient"):
        make_sae(sparsity_coefficient=0.1)
    with pytest.raises(ConfigError, match="sae.threshold_ema_decay"):
        make_sae("batchtopk", threshold_ema_decay=1.0)
    assert make_sae(k=64, k_aux=3.0).k_aux == 3  # 3.0 from the CLI is accepted as an integer
    assert make_sae().k_aux == 8  # default d_in // 2


def planted_data(n: int, d_in: int = 32, n_atoms: int = 64, active: int = 3) -> torch.Tensor:
    """x = sum of `active` random unit atoms (from a fixed dictionary) with coefficients in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(n_atoms, d_in, generator=g), dim=1)
    ids = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :active]
    coefs = 0.5 + torch.rand(n, active, generator=g)
    return torch.einsum("na,nad->nd", coefs, atoms[ids])


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_learns_planted_sparse_structure_through_the_module(variant):
    torch.manual_seed(0)
    data = planted_data(9216)
    train, held_out = data[:8192], data[8192:]
    sae = build_sae({"_target_": TARGETS[variant], "d_in": 32, "d_sae": 128, "k": 4,
                     "dead_window_tokens": 20_000})
    before, _ = evaluate_sae(sae, held_out, 512)
    optim = optim_config(lr=3e-3, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)
    module = SAEModule.single(sae, optim, max_steps=300, dead_window_tokens=20_000)
    assert module.member.coefficients() == {}
    trainer = L.Trainer(max_steps=300, max_epochs=-1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(train, batch_size=256, shuffle=True))
    metrics, _ = evaluate_sae(sae, held_out, 512)
    assert metrics["fvu"] < 0.3 < before["fvu"]
    if variant == "topk":
        assert metrics["l0"] <= 4.0
    else:  # the running threshold gives about k per token at evaluation (a lagging one gave 3.3)
        assert 3.6 < metrics["l0"] < 4.4
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_bf16_screen_selects_what_the_float32_matmul_does_and_steps_aside_when_it_declines(variant, monkeypatch):
    """Training through the bf16 screen keeps the same latents as the float32 path (values within float32
    rounding); when the screen declines (a batch-wide cutoff that failed, say), the float32 matmul decides."""
    from saelab.kernels import native

    monkeypatch.setattr(native, "fast_bf16", lambda: True)
    torch.manual_seed(0)
    sae = make_sae(variant)
    x = torch.randn(32, 16)
    plain = make_sae(variant, bf16_screen=False)
    plain.load_state_dict(sae.state_dict())
    expected = plain.training_loss(x, {}).feature_acts
    calls = []
    for name in ("screened_row_topk", "screened_batch_topk", "row_topk", "batch_topk"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    screened = sae.training_loss(x, {}).feature_acts
    assert calls == [{"topk": "screened_row_topk", "batchtopk": "screened_batch_topk"}[variant]]
    assert torch.equal(screened > 0, expected > 0)
    torch.testing.assert_close(screened, expected, rtol=1e-6, atol=1e-6)
    calls.clear()
    monkeypatch.setattr(native, "screened_row_topk", lambda *a: calls.append("declined"))
    monkeypatch.setattr(native, "screened_batch_topk", lambda *a: calls.append("declined"))
    assert torch.equal(sae.training_loss(x, {}).feature_acts, expected)
    assert calls == ["declined", {"topk": "row_topk", "batchtopk": "batch_topk"}[variant]]


def test_bf16_screen_must_be_a_bool():
    with pytest.raises(ConfigError, match="sae.bf16_screen"):
        make_sae(bf16_screen="yes")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("scaling", [False, True])
def test_auxk_options_follow_their_formulas(relu, scaling):
    """sae.auxk_relu: z_aux = ReLU of the dead pre-activations (Gao et al.'s code); sae.auxk_dead_scaling: the
    term times min(n_dead / k_aux, 1). Here 5 dead latents and k_aux 8: the factor is 5/8."""
    torch.manual_seed(0)
    sae = make_sae("topk", dead_window_tokens=1000, auxk_relu=relu, auxk_dead_scaling=scaling)
    dead = torch.tensor([3, 10, 20, 41, 63])
    sae.tokens_since_fired[dead] = 5000
    x = torch.randn(32, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    out = sae.training_loss(x, {})
    with torch.no_grad():
        pre = sae.pre_activations(x)
        e = x - sae(x)
        z_aux = torch.zeros_like(pre)
        z_aux[:, dead] = pre[:, dead].relu() if relu else pre[:, dead]
        assert (pre[:, dead] < 0).any()  # so the ReLU makes a difference
        expected = (e - z_aux @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum() / 32
        expected *= (x - x.mean(0)).pow(2).sum(-1).mean() * (5 / 8 if scaling else 1.0)
    assert out.terms["auxk"].item() == pytest.approx(expected.item(), rel=1e-4)
