"""Matryoshka BatchTopK: every prefix's loss and the per-level AuxK against the paper's formulas (written here
from dense tensors), the sparse path's gradients against dense autograd, widths validation."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

TARGET = "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE"
WIDTHS = [5, 24, 40, 64]  # uneven bands, none a power of two


def make_sae(**overrides):
    torch.manual_seed(0)
    sae = build_sae({"_target_": TARGET, "d_in": 16, "d_sae": 64, "k": 6, "matryoshka_widths": WIDTHS,
                     "decoder_constraint": "none"} | overrides)
    with torch.no_grad():  # independent encoder and decoder, decoder rows of different norms, nonzero biases
        sae.W_enc.normal_(0, 0.4)
        sae.W_dec.normal_(0, 0.4).mul_(torch.linspace(0.5, 2.0, 64).unsqueeze(1))
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
    return sae


def reference_latents(sae, x: torch.Tensor) -> torch.Tensor:
    """BatchTopK (Bussmann et al.): keep the B*k largest entries of ReLU((x - b_dec) W_enc + b_enc) in the batch."""
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    keep = acts.flatten().topk(x.shape[0] * sae.k).indices
    mask = torch.zeros(acts.numel(), dtype=torch.bool)
    mask[keep] = True
    return acts * mask.view_as(acts)


def reference_prefix_losses(sae, x: torch.Tensor, widths=WIDTHS, weights=None) -> dict[int, torch.Tensor]:
    """L_m = c_m E_b ||x - (f[:, :w_m] W_dec[:w_m] + b_dec)||^2: the prefix alone reconstructs x."""
    f = reference_latents(sae, x)
    weights = weights or [1.0] * len(widths)
    return {w: c * (x - (f[:, :w] @ sae.W_dec[:w] + sae.b_dec)).pow(2).sum(-1).mean()
            for w, c in zip(widths, weights, strict=True)}


def term_name(width: int) -> str:
    return "rec" if width == 64 else f"rec_{width}"


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_each_prefix_loss_is_a_batchtopk_reconstruction_restricted_to_that_prefix(path, monkeypatch):
    sae = make_sae(matryoshka_weights=[0.5, 1.0, 2.0, 1.5])
    if path == "autograd":
        monkeypatch.setattr(sae, "fused_ok", lambda x: False)
    x = torch.randn(48, 16)
    terms = sae.training_loss(x, {}).terms
    expected = reference_prefix_losses(sae, x, weights=[0.5, 1.0, 2.0, 1.5])
    assert set(terms) == {"rec_5", "rec_24", "rec_40", "rec", "auxk"}
    for width, loss in expected.items():
        assert terms[term_name(width)].item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_gradients_through_the_sparse_path_equal_dense_autograd(path, monkeypatch):
    sae = make_sae()
    if path == "autograd":
        monkeypatch.setattr(sae, "fused_ok", lambda x: False)
    x = torch.randn(48, 16)
    sum(sae.training_loss(x, {}).terms.values()).backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    sum(reference_prefix_losses(sae, x).values()).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-5), name


def test_auxk_fits_each_levels_dead_latents_to_that_levels_residual():
    sae = make_sae(dead_window_tokens=1000, k_aux=3)
    dead = torch.tensor([1, 2, 30, 33, 35, 38, 50])  # 2 dead in band [0,5), 0 in [5,24), 4 in [24,40), 1 in [40,64)
    sae.tokens_seen.fill_(5000)
    sae.tokens_since_fired[dead] = 5000
    x = torch.randn(48, 16)
    auxk = sae.training_loss(x, {}).terms["auxk"]
    with torch.no_grad():
        f = reference_latents(sae, x)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        input_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        expected, start = 0.0, 0
        for width in WIDTHS:
            band_dead = dead[(dead >= start) & (dead < width)]
            if len(band_dead):
                e = x - (f[:, :width] @ sae.W_dec[:width] + sae.b_dec)  # this level's residual
                k_aux = min(3, len(band_dead))
                top = pre[:, band_dead].topk(k_aux, dim=1)  # raw pre-activations of the band's dead latents
                z = torch.zeros(48, 64)
                z.scatter_(1, band_dead[top.indices], top.values)
                loss = (e - z @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * input_variance
                expected += loss * min(len(band_dead) / 3, 1.0)
            start = width
    assert auxk.item() == pytest.approx(sae.cfg.auxk_alpha * expected.item(), rel=1e-4)


def test_default_widths_and_invalid_widths_fail_with_a_config_error():
    assert build_sae({"_target_": TARGET, "d_in": 16, "d_sae": 256, "k": 4}).widths == [4, 16, 64, 256]
    for widths in ([8, 8, 64], [8, 32], [32, 8, 64], [0, 64], [], [8.5, 64]):
        with pytest.raises(ConfigError, match="sae.matryoshka_widths") as raised:
            make_sae(matryoshka_widths=widths)
        assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="ending at d_sae \\(64\\)"):
        make_sae(matryoshka_widths=[8, 32])
    with pytest.raises(ConfigError, match="sae.matryoshka_weights"):
        make_sae(matryoshka_weights=[1.0, 1.0])
