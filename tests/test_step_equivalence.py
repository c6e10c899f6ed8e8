"""The training step (fused kernels, folded b_dec, sparse TopK backward, and the autograd path) against plain
PyTorch.

Each reference below is a straightforward transcription of the variant's loss (SPEC sections 1-4), autograd
doing all gradients. The optimised `training_loss` must give the same loss terms and the same gradient for
every parameter, within float32 tolerance.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from saelab.kernels import native
from saelab.kernels.sparse_products import SparsePattern
from saelab.run.module import SAEModule
from saelab.saes.base import SAE
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.gated import GatedSAE
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

D_IN, D_SAE, BATCH = 16, 64, 48


def mse(x, x_hat):
    return (x_hat - x).pow(2).sum(-1).mean()


def ref_relu(sae, x, coef):
    """SPEC 1: f = ReLU(W_enc (x - b_dec) + b_enc); l1: lambda ||f||_1; ri_l1: lambda sum_i f_i ||d_i||."""
    x_c = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    f = torch.relu(x_c @ sae.W_enc + sae.b_enc)
    # A crosscoder (Lindsey et al. 2024) weights a latent by the sum over its sites of its decoder norms.
    sites = sae.W_dec.view(sae.d_sae, sae.cfg.sites, -1).norm(dim=-1).sum(-1)
    weights = sites if sae.cfg.sparsity == "ri_l1" else torch.ones(f.shape[-1])
    return {"rec": mse(x, f @ sae.W_dec + sae.b_dec), "sparsity": coef * (f * weights).sum(-1).mean()}


def straight_through(value, surrogate):
    """`value` forward; the gradient of `surrogate` backward (surrogate is written to be 0 in value)."""
    return value + surrogate


def ref_jumprelu(sae, x, coef):
    """SPEC 3: f_i = pi_i H(pi_i - theta_i) with the STEs d f_i/d theta_i := -(theta_i/eps) K((pi_i-theta_i)/eps),
    d H/d theta_i := -(1/eps) K(.), d f_i/d pi_i = H exactly; with ste_to_preacts pi also gets the negative of
    theta's pseudo-gradient. Penalties: l0 lambda sum_i H(pi_i - theta_i); tanh lambda sum_i tanh(c f_i ||d_i||);
    pre_act lambda_p sum_i ReLU(theta_i - pi_i) ||d_i||."""
    cfg, theta = sae.cfg, sae.threshold
    x_c = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    pre = x_c @ sae.W_enc + sae.b_enc
    eps = cfg.bandwidth

    def kernel(u):
        return (u.abs() < 0.5).float() if cfg.kernel == "rectangle" else (1 - u.abs()).clamp_min(0)

    k = (kernel((pre - theta) / eps) / eps).detach()
    h = (pre > theta).float()
    d_theta, d_pre = theta - theta.detach(), pre - pre.detach()  # zero in value, carriers of gradient
    f = straight_through(pre * h, -(theta.detach() * k) * d_theta
                         + ((theta.detach() * k) * d_pre if cfg.ste_to_preacts else 0))
    h_ste = straight_through(h, -k * d_theta + (k * d_pre if cfg.ste_to_preacts else 0))
    norms = sae.W_dec.norm(dim=1)
    if cfg.sparsity == "l0":
        penalty = h_ste.sum(-1).mean()
    else:
        penalty = torch.tanh(cfg.tanh_scale * f * norms).sum(-1).mean()
    terms = {"rec": mse(x, f @ sae.W_dec + sae.b_dec), "sparsity": coef * penalty}
    if cfg.pre_act_loss_coefficient > 0:
        terms["pre_act"] = cfg.pre_act_loss_coefficient * (torch.relu(theta - pre) * norms).sum(-1).mean()
    return terms


def ref_gated(sae, x, coef):
    """SPEC 2: pi_gate = W_gate x_c + b_gate, pi_mag = W_mag x_c + b_mag (W_mag = exp(r_mag) W_gate when tied),
    f = gate(pi_gate) ReLU(pi_mag); L = L_rec + lambda sum_i g_i [||d_i||] + L_aux, with
    L_aux = ||x - (sg(W_dec) ReLU(pi_gate) + sg(b_dec))||^2. A frozen decoder (frozen_decoder, and none, which
    only drops L_aux) is frozen everywhere in the gate's terms: b_dec in their centring and ||d_i|| under ri_l1."""
    cfg = sae.cfg
    frozen = cfg.aux_loss != "unfrozen_decoder"
    b_dec = sae.b_dec if cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
    x_c = x - b_dec
    x_c_gate = x - (b_dec.detach() if frozen else b_dec)
    pi_gate = x_c @ sae.W_enc + sae.b_gate  # as the magnitude path sees the decoder: live
    pi_gate_terms = x_c_gate @ sae.W_enc + sae.b_gate  # as the gate's own terms see it
    W_mag = sae.W_mag if not cfg.tie_encoder else sae.W_enc * sae.r_mag.exp()
    mag = torch.relu(x_c @ W_mag + sae.b_mag)
    if cfg.gate == "heaviside":
        f, g = (pi_gate > 0).float() * mag, torch.relu(pi_gate_terms)
    else:
        f, g = torch.sigmoid(pi_gate / cfg.gate_temperature) * mag, torch.sigmoid(pi_gate_terms / cfg.gate_temperature)
    norms = sae.W_dec.norm(dim=1)
    weights = (norms.detach() if frozen else norms) if cfg.sparsity == "ri_l1" else torch.ones_like(norms)
    terms = {"rec": mse(x, f @ sae.W_dec + sae.b_dec), "sparsity": coef * (g * weights).sum(-1).mean()}
    if cfg.aux_loss != "none":
        W_dec, b_dec_aux = (sae.W_dec.detach(), sae.b_dec.detach()) if frozen else (sae.W_dec, sae.b_dec)
        terms["aux"] = mse(x, torch.relu(pi_gate_terms) @ W_dec + b_dec_aux)
    return terms


def ref_topk(sae, x, batch_topk: bool):
    pre = sae.centre(x) @ sae.W_enc + sae.b_enc
    if batch_topk:
        flat = pre.flatten()
        ids = flat.topk(x.shape[0] * sae.k).indices
        f = torch.zeros_like(flat).index_put((ids,), flat[ids].relu()).view_as(pre)
    else:
        top = pre.topk(sae.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat = f @ sae.W_dec + sae.b_dec
    terms = {"rec": mse(x, x_hat)}
    dead = sae.dead_mask(sae.cfg.dead_window_tokens)
    if sae.cfg.auxk_alpha > 0 and not dead.any():
        terms["auxk"] = pre.new_zeros(())
    elif sae.cfg.auxk_alpha > 0:
        e = (x - x_hat).detach()
        masked = pre.masked_fill(~dead, float("-inf"))
        top = masked.topk(min(sae.k_aux, int(dead.sum())), dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        e_hat = z @ sae.W_dec
        # Gao et al.'s normalised AuxK MSE on the scale of the unnormalised L_rec (times E_b ||x - mean x||^2).
        terms["auxk"] = (sae.cfg.auxk_alpha * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
                         * (x - x.mean(0)).pow(2).sum(-1).mean() * min(int(dead.sum()) / sae.k_aux, 1.0))
    return terms


def perturb(sae):
    """Every parameter moved, so every gradient path carries signal and no two paths can stand in for each other:
    biases and gains off zero, every encoder matrix independent of W_dec^T (a backward that used W_enc where
    W_dec^T belongs would pass if they were equal, as they are at initialisation), and decoder rows of unequal
    norms (a kernel that assumed unit rows would pass otherwise)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name != "W_dec":  # an encoder matrix: fresh, of the same scale
                p.copy_(p.std() * torch.randn(p.shape, generator=g))
        sae.W_dec.mul_(0.5 + 1.5 * torch.rand(sae.W_dec.shape[0], 1, generator=g))  # row norms in [0.5, 2]


def check(sae, ref_terms_fn, x, coefficients, atol=1e-5):
    ref = copy.deepcopy(sae)
    out = sae.training_loss(x, coefficients)
    ref_terms = ref_terms_fn(ref, x)
    assert set(out.terms) == set(ref_terms)
    for name in ref_terms:
        torch.testing.assert_close(out.terms[name], ref_terms[name], atol=atol, rtol=1e-5)
    sum(out.terms.values()).backward()
    sum(ref_terms.values()).backward()
    params = dict(ref.named_parameters())
    for name, p in sae.named_parameters():
        ref_grad = params[name].grad
        if ref_grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grad, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    return out


@pytest.fixture(autouse=True, params=["fused", "fused-torch", "fused-triton", "autograd"])
def step_path(request, monkeypatch):
    """Every test runs four times: through the fused float32 kernels (with kernels/native.py's C++ kernels on
    the CPU), through the same with the C++ kernels switched off (their torch fallbacks, as on a machine without
    g++), through the GPU's Triton kernels (kernels/triton_gpu.py, here in Triton's CPU interpreter: conftest
    sets TRITON_INTERPRET=1 without a GPU), and through the plain autograd path that runs under autocast
    (bf16-mixed), forced here by refusing the fused kernels."""
    if request.param == "fused-torch":
        monkeypatch.setenv("SAELAB_KERNELS", "torch")
    if request.param == "fused-triton":
        monkeypatch.setenv("SAELAB_KERNELS", "triton")
    if request.param == "autograd":
        monkeypatch.setattr(SAE, "fused_ok", lambda self, x: False)
    return request.param


@pytest.fixture
def x():
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(0)) / D_IN**0.5 + 0.05


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize(("sparsity", "sites"), [("l1", 1), ("ri_l1", 1), ("ri_l1", 4)])
def test_relu(x, apply_b_dec, sparsity, sites):
    torch.manual_seed(0)
    constraint = "none" if sparsity == "ri_l1" else "unit_norm"
    sae = ReluSAE(ReluSAE.Config(d_in=D_IN // sites, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec,
                                 sparsity=sparsity, decoder_constraint=constraint, sites=sites))
    perturb(sae)
    out = check(sae, lambda s, x: ref_relu(s, x, 0.1), x, {"sparsity": 0.1})
    torch.testing.assert_close(out.feature_acts, sae.encode(x))


@pytest.mark.parametrize("kernel", ["rectangle", "triangle"])
@pytest.mark.parametrize("threshold_param", ["raw", "raw_positive", "log"])
def test_jumprelu(x, kernel, threshold_param, monkeypatch, step_path):
    """raw: perturbed thresholds, some negative (the fused kernel's bool-mask path); raw_positive and log:
    all thresholds > 0, as training keeps them (its mask-free path, and natively its one-pass forward)."""
    ran = []  # calls that ran the kernel (the wrapper returns None when it declines)
    kernel_fn = native.jumprelu_forward

    def spy(*args, **kwargs):
        result = kernel_fn(*args, **kwargs)
        ran.extend([] if result is None else [1])
        return result

    monkeypatch.setattr(native, "jumprelu_forward", spy)
    torch.manual_seed(0)
    # A wide bandwidth so that many pre-activations fall in the kernel window.
    sae = JumpReLUSAE(JumpReLUSAE.Config(d_in=D_IN, d_sae=D_SAE, bandwidth=0.2, kernel=kernel,
                                         threshold_param=threshold_param.removesuffix("_positive")))
    perturb(sae)
    if threshold_param == "raw":
        assert (sae.threshold < 0).any()
    elif threshold_param == "raw_positive":
        sae.after_optimizer_step()  # clamps raw thresholds to the positive floor, as after every step
    assert (sae.threshold > 0).all() or threshold_param == "raw"
    out = check(sae, lambda s, x: ref_jumprelu(s, x, 0.05), x, {"sparsity": 0.05})
    torch.testing.assert_close(out.feature_acts, sae.encode(x))
    assert bool(ran) == (step_path == "fused" and threshold_param != "raw")
    if ran:  # the kernel's firing mask replaced the max-reduction over f
        assert out.fired_mask is not None and torch.equal(out.fired_mask, (out.feature_acts > 0).any(0))


@pytest.mark.parametrize("aux_loss", ["frozen_decoder", "none"])
@pytest.mark.parametrize("r_mag", [True, False])
def test_gated(x, aux_loss, r_mag, monkeypatch, step_path):
    ran = set()  # the kernels that ran (a wrapper returning None declined)

    def spy(*args, _kernel, _name, **kwargs):
        result = _kernel(*args, **kwargs)
        if result is not None:
            ran.add(_name)
        return result

    for name in ("gated_forward", "gated_backward_mag", "gated_backward_gate"):
        monkeypatch.setattr(native, name, functools.partial(spy, _kernel=getattr(native, name), _name=name))
    torch.manual_seed(0)
    sae = GatedSAE(GatedSAE.Config(d_in=D_IN, d_sae=D_SAE, aux_loss=aux_loss, r_mag=r_mag))
    perturb(sae)
    if not r_mag:
        with torch.no_grad():
            sae.r_mag.add_(0.1)
    out = check(sae, lambda s, x: ref_gated(s, x, 0.15), x, {"sparsity": 0.15})
    torch.testing.assert_close(out.feature_acts, sae.encode(x))
    native_ran = {"gated_forward", "gated_backward_mag", "gated_backward_gate"}
    assert ran == (native_ran if step_path == "fused" else set())
    if ran:  # the kernel's firing mask replaced the max-reduction over f
        assert out.fired_mask is not None and torch.equal(out.fired_mask, (out.feature_acts > 0).any(0))


JUMPRELU_OPTIONS = [
    {"sparsity": "tanh", "decoder_constraint": "none"},
    {"ste_to_preacts": True},
    {"pre_act_loss_coefficient": 0.3},
    {"sparsity": "tanh", "decoder_constraint": "none", "ste_to_preacts": True, "pre_act_loss_coefficient": 0.3,
     "apply_b_dec_to_input": False},
]
GATED_OPTIONS = [
    {"aux_loss": "unfrozen_decoder"},
    {"gate": "sigmoid", "gate_temperature": 0.5, "aux_loss": "none"},
    {"gate": "sigmoid", "gate_temperature": 0.5},
    {"tie_encoder": False},
    {"sparsity": "ri_l1", "decoder_constraint": "none"},
    {"sparsity": "ri_l1", "decoder_constraint": "none", "aux_loss": "unfrozen_decoder"},
    {"apply_b_dec_to_input": False},
]


@pytest.mark.parametrize("options", JUMPRELU_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_jumprelu_options(x, options):
    """The autograd-only options against the SPEC's formulas (thresholds > 0, a wide bandwidth)."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAE.Config(d_in=D_IN, d_sae=D_SAE, bandwidth=0.2, **options))
    perturb(sae)
    with torch.no_grad():
        sae.raw_threshold.abs_().add_(0.01)
    check(sae, lambda s, x: ref_jumprelu(s, x, 0.05), x, {"sparsity": 0.05})


@pytest.mark.parametrize("options", GATED_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gated_options(x, options):
    torch.manual_seed(0)
    sae = GatedSAE(GatedSAE.Config(d_in=D_IN, d_sae=D_SAE, **options))
    perturb(sae)
    check(sae, lambda s, x: ref_gated(s, x, 0.15), x, {"sparsity": 0.15})


@pytest.mark.parametrize("name", ["relu", "jumprelu", "gated", "topk", "batchtopk"])
def test_at_the_benchmark_width(name, step_path):
    """d_in 384, d_sae 3072 (the shape the kernels were tuned at: vector tails, several threads' column ranges)."""
    if step_path == "fused-triton" and name in ("topk", "batchtopk"):
        pytest.skip("the sparse Triton kernels take minutes in the interpreter at this width (tests/test_cuda.py)")
    d_in = 384
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(0)) / d_in**0.5 + 0.01
    check_wide_step(name, d_in, 3072, x, k_aux=64)


def check_wide_step(name: str, d_in: int, d_sae: int, x: torch.Tensor, k_aux: int, device: str = "cpu") -> None:
    """A perturbed SAE of this variant at a realistic width (a third of TopK's latents dead, so AuxK runs; JumpReLU's
    thresholds positive, as training keeps them) against its SPEC reference on x (tests/test_cuda.py: on a GPU)."""
    torch.manual_seed(0)
    if name == "relu":
        sae, ref, coef = ReluSAE(ReluSAE.Config(d_in=d_in, d_sae=d_sae)), ref_relu, 0.1
    elif name == "jumprelu":
        sae, ref, coef = JumpReLUSAE(JumpReLUSAE.Config(d_in=d_in, d_sae=d_sae, bandwidth=0.05)), ref_jumprelu, 0.05
    elif name == "gated":
        sae, ref, coef = GatedSAE(GatedSAE.Config(d_in=d_in, d_sae=d_sae)), ref_gated, 0.15
    else:
        cls = TopKSAE if name == "topk" else BatchTopKSAE
        sae = cls(cls.Config(d_in=d_in, d_sae=d_sae, k=32, k_aux=k_aux, dead_window_tokens=100, bf16_screen=False))
        sae.tokens_since_fired[::3] = 100
    perturb(sae)
    sae = sae.to(device)
    if name == "jumprelu":
        sae.after_optimizer_step()  # thresholds > 0 (the native one-pass forward's case); decoder rows renormalised
    if name in ("topk", "batchtopk"):
        check(sae, lambda s, x: ref_topk(s, x, batch_topk=name == "batchtopk"), x, {}, atol=1e-4)
    else:
        check(sae, lambda s, x: ref(s, x, coef), x, {"sparsity": coef}, atol=1e-4)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_topk(x, cls, with_dead, apply_b_dec, monkeypatch, step_path):
    monkeypatch.setattr(SparsePattern, "check_invariants", True)  # torch verifies every CSR matrix built
    monkeypatch.setattr(native, "fast_bf16", lambda: True)  # screen wherever asked (exact on any CPU, only slower)
    for bf16_screen in [True, False] if step_path == "fused" else [False]:  # the screen is part of the fused path
        with monkeypatch.context() as patch:
            check_topk_step(x, cls, with_dead, apply_b_dec, bf16_screen, patch, step_path)


def check_topk_step(x, cls, with_dead, apply_b_dec, bf16_screen, monkeypatch, step_path):
    torch.manual_seed(0)
    sae = cls(cls.Config(d_in=D_IN, d_sae=D_SAE, k=4, k_aux=6, dead_window_tokens=100,
                         apply_b_dec_to_input=apply_b_dec, bf16_screen=bf16_screen))
    perturb(sae)
    if with_dead:  # half the latents dead, so AuxK runs
        sae.tokens_seen.fill_(1000)
        sae.tokens_since_fired[::2] = 500
    ran = []  # kernels that ran (a wrapper returning None declined, and its torch twin ran instead)

    def spy(*args, _kernel, _name, **kwargs):
        result = _kernel(*args, **kwargs)
        if result is not None:
            ran.append(_name)
        return result

    for name in ("row_topk", "batch_topk", "screened_row_topk", "screened_batch_topk", "group_by", "sparse_decode",
                 "sampled_dot", "sparse_t_dense"):
        monkeypatch.setattr(native, name, functools.partial(spy, _kernel=getattr(native, name), _name=name))
    out = check(sae, lambda s, x: ref_topk(s, x, cls is BatchTopKSAE), x, {})
    assert bool(out.terms["auxk"] > 0) == with_dead
    selection = {("screened_" if bf16_screen else "") + ("batch_topk" if cls is BatchTopKSAE else "row_topk")}
    selection |= {"row_topk"} if with_dead else set()  # AuxK: per token, among the dead latents
    expected = selection | {"group_by", "sparse_decode", "sampled_dot", "sparse_t_dense"}
    # The autograd path selects natively too (the values get their gradient from a gather); switched off, none ran.
    natives = {"fused": expected, "autograd": selection, "fused-torch": set(), "fused-triton": set()}
    assert set(ran) == natives[step_path]


@pytest.mark.parametrize("cls", [ReluSAE, JumpReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE])
def test_module_step_l0_and_firing(x, cls):
    """step_loss's L0 and firing mask (a max-reduction, or the sparse entries for TopK) equal the plain
    formulas on the dense latents."""
    torch.manual_seed(0)
    cfg = {"d_in": D_IN, "d_sae": D_SAE} | ({"k": 4} if issubclass(cls, TopKSAE) else {})
    sae = cls(cls.Config(**cfg))
    module = SAEModule.single(sae, {"lr": 1e-4}, max_steps=10, dead_window_tokens=1000)
    coefficients = {name: value for name, (value, _) in sae.scheduled_coefficients.items()}
    _, out = module.member.step_loss(x, coefficients)
    f = out.feature_acts
    torch.testing.assert_close(out.extras["l0"], (f > 0).sum(-1).float().mean())
    assert isinstance(out.latents, torch.Tensor) != issubclass(cls, TopKSAE)  # TopK latents stay sparse
    assert torch.equal(out.fired(), (f > 0).any(0)) and int(out.active_count()) == int((f > 0).sum())
    assert torch.equal(sae.tokens_since_fired == 0, (f > 0).any(0))
    assert int(sae.tokens_seen) == BATCH
