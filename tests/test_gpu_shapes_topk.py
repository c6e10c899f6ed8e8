"""TopK-family work at GPU shapes, checked on the CPU (issue 24, items 7-9).

- The bf16 screen is a CPU float32 device: it is decided before its [B, d_sae] buffer exists, so a GPU step (or
  any tensor the CPU kernels cannot take) never allocates one; the CPU's flags are read from /proc/cpuinfo once.
- Every torch.topk call sees at most TOPK_MAX_ELEMENTS entries (PyTorch's CUDA topk leaves its multi-block
  kernel beyond 32-bit index math), and the chunked selection equals one topk.
- AuxK on a GPU step (fixed shapes) takes no more entries per token than the host's bound on the dead latents,
  with the same loss and gradients; Matryoshka decodes its B*k entries once for all levels, not once per level.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from saelab.kernels import native, native_library, selection
from saelab.saes import auxk as auxk_module
from saelab.saes import build_sae
from saelab.saes import topk as topk_module

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

TARGETS = {"topk": "saelab.saes.topk.TopKSAE", "batchtopk": "saelab.saes.batchtopk.BatchTopKSAE",
           "matryoshka": "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE"}


def make_sae(variant: str = "topk", **overrides):
    torch.manual_seed(0)
    return build_sae({"_target_": TARGETS[variant], "d_in": 16, "d_sae": 64, "k": 4} | overrides)


# -- item 9: CPU-only work stays on the CPU ---------------------------------------------------------------------

def screen_buffers(sae) -> list[str]:
    return [name for name, buf in sae.__dict__.get("_workspace", {}).items() if buf.dtype == torch.bfloat16]


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_the_bf16_screen_is_never_tried_off_the_cpu(variant, monkeypatch):
    """A CPU with bf16 dot products (faked) and a tensor elsewhere (the meta device stands for CUDA: no data, the
    same allocation): no bf16 buffer is made and the screen is not asked. Before, screened_select allocated its
    [B, d_sae] bf16 workspace on the tensor's device first and only then found the screen could not run."""
    monkeypatch.setattr(native, "fast_bf16", lambda: True)
    asked = []
    monkeypatch.setattr(native, "bf16_screen", lambda *a, **k: asked.append(1))
    sae = make_sae(variant).to("meta")
    x = torch.empty(32, 16, device="meta")
    assert sae.screened_select(x, torch.empty(64, device="meta")) is None
    assert screen_buffers(sae) == [] and asked == []


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_a_step_on_the_gpu_kernels_allocates_no_screen(variant, monkeypatch):
    """A whole training step on the GPU's kernels (Triton, in its interpreter here): no bf16 buffer. On the CPU
    in float32 with the native kernels the screen still runs (the check is not vacuous)."""
    monkeypatch.setattr(native, "fast_bf16", lambda: True)
    x = torch.randn(32, 16)
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    sae = make_sae(variant)
    sae.training_loss(x, {})
    assert screen_buffers(sae) == []
    monkeypatch.setenv("SAELAB_KERNELS", "auto")
    if native.library() is None:
        pytest.skip("no C++ compiler: the native kernels (and so the screen) are off here")
    sae.training_loss(x, {})
    assert screen_buffers(sae) == ["screen"] and sae.screen_candidates_per_token is not None


def test_cpu_flags_are_read_once(monkeypatch):
    """fast_bf16 and the kernels' cache key ask for the CPU's flags; /proc/cpuinfo is read at most once."""
    if hasattr(native_library.cpu_flags, "cache_clear"):
        native_library.cpu_flags.cache_clear()
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            reads.append(1)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    flags = [native_library.cpu_flags() for _ in range(5)]
    assert len(set(flags)) == 1 and len(reads) <= 1


# -- item 8: no topk over more than TOPK_MAX_ELEMENTS entries ---------------------------------------------------

LIMIT = 1000


def limit_topk(patch: pytest.MonkeyPatch) -> list[int]:
    """Lower the limit to LIMIT entries (raising=False: before the fix there was none, and the sizes show it);
    returns the number of entries each torch.topk call sees from then on."""
    patch.setattr(selection, "TOPK_MAX_ELEMENTS", LIMIT, raising=False)
    sizes: list[int] = []
    topk = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        sizes.append(self.numel())
        return topk(self, *args, **kwargs)

    patch.setattr(torch.Tensor, "topk", spy)
    return sizes


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batchtopk_selects_in_chunks_what_one_topk_selects(kernels, with_bias, monkeypatch):
    """BatchTopK's B*k largest of B x d_sae = 3,072 entries with a limit of 1,000: every topk call within it, the
    same ids and values as one topk over everything (torch: also through the theta shortcut's candidates)."""
    monkeypatch.setenv("SAELAB_KERNELS", kernels)
    sae = make_sae("batchtopk")
    pre, bias = torch.randn(48, 64), torch.randn(64) if with_bias else None
    flat = pre.flatten() if bias is None else (pre + bias).flatten()
    exact = flat.topk(48 * 4).indices.sort().values
    for batches, threshold in ((0, 0.0), (1, 0.5), (1, -10.0)):  # no shortcut; 1,900 candidates; all 3,072
        sae.threshold_batches.fill_(batches)
        sae.threshold.fill_(threshold)
        with pytest.MonkeyPatch.context() as patch:
            sizes = limit_topk(patch)
            ids, values = sae.batch_topk(pre, bias)
        assert sizes and max(sizes) <= LIMIT, sizes
        assert torch.equal(ids, exact) and torch.equal(values, flat[exact])


@pytest.mark.parametrize(("n", "k"), [(1000, 7), (1001, 7), (3500, 200), (9000, 400), (2500, 501), (2500, 1200)])
def test_chunked_topk_is_exact(n, k, monkeypatch):
    """Any n and k: chunks of the limit, candidates in chunks again while too many (k 400 of 9,000: 3,600, then
    1,600, then 800 candidates), and a k above half the limit in one call (chunks would barely shrink)."""
    scores = torch.randperm(n).float()  # distinct: the set is unique
    exact = scores.topk(k).indices.sort().values
    sizes = limit_topk(monkeypatch)
    ids = selection.chunked_topk(scores, k)
    assert torch.equal(ids.sort().values, exact)
    assert max(sizes) <= (LIMIT if k <= LIMIT // 2 else n)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_per_token_topk_runs_in_blocks_of_rows(kernels, monkeypatch):
    """[50, 64] (3,200 entries) in blocks of 15 rows: the same rows, ids and values as one topk per row, through
    both of the fallback's paths (the grouped prefilter at k 4, a plain topk at k 5)."""
    monkeypatch.setenv("SAELAB_KERNELS", kernels)
    scores = torch.randn(50, 64)
    for k in (4, 5):
        reference = scores.topk(k, dim=-1)
        with pytest.MonkeyPatch.context() as patch:
            sizes = limit_topk(patch)
            rows, ids, values = selection.per_token_topk(scores, k)
        assert sizes and max(sizes) <= LIMIT, sizes
        assert torch.equal(rows, torch.arange(50).repeat_interleave(k))
        assert torch.equal(ids.view(50, k).sort(-1).values, reference.indices.sort(-1).values)
        assert torch.equal(scores.gather(1, ids.view(50, k)), values.view(50, k))


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_a_gpu_step_keeps_every_topk_within_the_limit(variant, monkeypatch):
    """A whole training step on the GPU's kernels with a third of the latents dead (so AuxK runs): no topk call
    over more than the limit (48 x 64 = 3,072 entries), and the same loss terms and gradients as without it."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    widths = {"matryoshka_widths": [16, 40, 64]} if variant == "matryoshka" else {}
    sae = make_sae(variant, k_aux=6, dead_window_tokens=100, **widths)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 100
    x = torch.randn(48, 16)
    reference = copy.deepcopy(sae)
    expected = reference.training_loss(x, {}).terms
    sum(expected.values()).backward()
    with pytest.MonkeyPatch.context() as patch:
        sizes = limit_topk(patch)
        terms = sae.training_loss(x, {}).terms
    assert sizes and max(sizes) <= LIMIT, sizes
    assert terms.keys() == expected.keys() and float(terms["auxk"]) > 0
    for name, term in terms.items():
        torch.testing.assert_close(term, expected[name], rtol=1e-6, atol=1e-7)
    sum(terms.values()).backward()
    grads = dict(reference.named_parameters())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


# -- item 7: AuxK's fixed-shape selection no wider than the dead latents can be --------------------------------

DEAD = [3, 17, 40]  # one per band of widths [16, 40, 64]
DYING = [5, 6, 7, 50]  # alive at the read; dead 40 tokens later if they never fire


def auxk_selections(patch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(columns, k) of every per-token top-k that AuxK's fixed-shape path (masked_auxk_loss) runs from now on."""
    calls: list[tuple[int, int]] = []
    inside: list[int] = []
    masked, per_token_topk = topk_module.TopKSAE.masked_auxk_loss, auxk_module.per_token_topk

    def watched(self, *args):
        inside.append(1)
        try:
            return masked(self, *args)
        finally:
            inside.pop()

    def spy(scores, k, bias=None):
        if inside:
            calls.append((scores.shape[1], k))
        return per_token_topk(scores, k, bias)

    patch.setattr(topk_module.TopKSAE, "masked_auxk_loss", watched)
    patch.setattr(auxk_module, "per_token_topk", spy)
    return calls


def dying_sae(variant: str, **overrides):
    """An SAE whose counters a logging step has just read (refresh_dead_bound): DEAD at the window (100 tokens),
    DYING 40 tokens short of it, the rest fired on the last batch."""
    sae = make_sae(variant, k_aux=8, dead_window_tokens=100, **overrides)
    with torch.no_grad():
        sae.tokens_since_fired[DEAD] = 100
        sae.tokens_since_fired[DYING] = 60
    sae.refresh_dead_bound()
    return sae


def unbounded(sae):
    """A copy that has forgotten the host's bound (a load does), so its AuxK takes min(k_aux, band width)."""
    copied = copy.deepcopy(sae)
    copied.load_state_dict(copied.state_dict())
    return copied


def assert_same_step(sae, reference, x: torch.Tensor) -> None:
    """The same loss terms and parameter gradients from both SAEs on x."""
    terms, expected = sae.training_loss(x, {}).terms, reference.training_loss(x, {}).terms
    assert terms.keys() == expected.keys() and float(terms["auxk"]) > 0
    for name, term in terms.items():
        torch.testing.assert_close(term, expected[name], rtol=1e-6, atol=0, msg=name)
    sum(terms.values()).backward()
    sum(expected.values()).backward()
    grads = dict(reference.named_parameters())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("path", ["fused", "autograd"])
@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_auxk_takes_no_more_entries_per_token_than_latents_can_be_dead(variant, path, monkeypatch):
    """On the GPU's kernels, right after the read at most 3 latents can be dead, so AuxK's top-k takes 3 entries per
    token, not k_aux = 8; 48 tokens later the 4 dying ones may be dead too (7). Either way the loss terms and
    gradients are those of the uncapped selection. Before, every step took k_aux."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    sae = dying_sae(variant)
    if path == "autograd":
        monkeypatch.setattr(type(sae), "fused_ok", lambda self, x: False)
    x = torch.randn(48, 16)
    reference = unbounded(sae)
    with pytest.MonkeyPatch.context() as patch:
        calls = auxk_selections(patch)
        assert_same_step(sae, reference, x)
    assert calls == [(64, 3), (64, 8)]  # this SAE's, then the reference's

    nothing_fired = torch.zeros(64, dtype=torch.bool)
    for model in (sae, reference):
        model.zero_grad()
        model.record_fired(nothing_fired, 48)  # counters 60 -> 108: the dying latents are dead now
    assert int(sae.dead_mask(100).sum()) == 7
    with pytest.MonkeyPatch.context() as patch:
        calls = auxk_selections(patch)
        assert_same_step(sae, reference, x)
    assert calls == [(64, 7), (64, 8)]


def test_the_dead_bound_follows_the_counters_and_is_forgotten_on_load():
    """Read on a logging step: each latent's counter may grow by the tokens since (none can grow more), so the bound
    counts the latents that were within that many tokens of the window; a load forgets it."""
    sae = dying_sae("topk")
    assert sae.dead_bound(100) == 3 and sae.dead_bound(50) is None  # another window: unknown
    assert unbounded(sae).dead_bound(100) is None
    for tokens, bound in ((39, 3), (1, 7), (40, 7), (60, 64)):  # cumulative: 39, 40, 80, 140 tokens since the read
        sae.record_fired(torch.ones(64, dtype=torch.bool), tokens)  # all fired: the bound cannot know that
        assert sae.dead_bound(100) == bound
    sae.refresh_dead_bound()  # everything fired: nothing can be dead for another 99 tokens
    assert sae.dead_bound(100) == 0 and sae.none_dead(100)
    sae.load_state_dict(sae.state_dict())
    assert sae.dead_bound(100) is None and not sae.none_dead(100)


def dense_matryoshka_terms(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's Matryoshka BatchTopK loss from dense tensors (test_matryoshka's formulas): every prefix
    reconstructs x, and each band's dead latents (their top min(k_aux, n_dead) raw pre-activations) fit that level's
    residual, with Gao et al.'s normalisation and min(n_dead / k_aux, 1)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    keep = pre.flatten().topk(x.shape[0] * sae.k).indices
    f = torch.zeros_like(pre).flatten().index_put((keep,), pre.flatten()[keep].relu()).view_as(pre)
    dead, variance = sae.dead_mask(sae.cfg.dead_window_tokens), (x - x.mean(0)).pow(2).sum(-1).mean()
    terms, auxk, start = {}, 0.0, 0
    for width in sae.widths:
        x_hat = f[:, :width] @ sae.W_dec[:width] + sae.b_dec
        terms["rec" if width == sae.d_sae else f"rec_{width}"] = (x - x_hat).pow(2).sum(-1).mean()
        band = dead.nonzero().squeeze(1)
        band = band[(band >= start) & (band < width)]
        if len(band):
            e = (x - x_hat).detach()
            top = pre[:, band].topk(min(sae.k_aux, len(band)), dim=1)
            z = torch.zeros_like(pre).scatter(1, band[top.indices], top.values)
            auxk = auxk + ((e - z @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * variance
                           * min(len(band) / sae.k_aux, 1.0))
        start = width
    return terms | {"auxk": sae.cfg.auxk_alpha * auxk}


def test_matryoshka_decodes_its_entries_once_and_caps_each_levels_auxk(monkeypatch):
    """On the GPU's kernels: the B k selected entries go through one sparse decode for all three levels (before:
    one decode of all B k entries per level, zeros off the band), and each level's AuxK selects over its own band
    (16, 24, 24 latents, not 64) with k capped at the 3 latents that can be dead (before: k_aux = 8). Loss terms and
    gradients are the dense formulas'."""
    from saelab.saes import matryoshka_batchtopk as matryoshka_module

    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    sae = dying_sae("matryoshka", matryoshka_widths=[16, 40, 64], decoder_constraint="none")
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64).unsqueeze(1))
    reference = copy.deepcopy(sae)
    decoded: list[int] = []
    sparse_decode = matryoshka_module.SparseDecode

    class CountingDecode:
        @staticmethod
        def apply(values, *args):
            decoded.append(values.numel())
            return sparse_decode.apply(values, *args)

    x = torch.randn(48, 16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matryoshka_module, "SparseDecode", CountingDecode)
        calls = auxk_selections(patch)
        terms = sae.training_loss(x, {}).terms
    assert decoded == [48 * 4]
    assert calls == [(16, 3), (24, 3), (24, 3)]
    expected = dense_matryoshka_terms(reference, x)
    assert terms.keys() == expected.keys() and float(terms["auxk"]) > 0
    for name, term in terms.items():
        torch.testing.assert_close(term, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    sum(terms.values()).backward()
    sum(expected.values()).backward()
    grads = dict(reference.named_parameters())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
