"""kernels/native.py's C++ kernels against plain torch references, in both builds: the default (-march=native,
AVX-512 on this machine) and a portable one (-march=x86-64-v2: no AVX at all, so the scalar code paths run).

Selection must be exact, including ties (the lower index wins) and NaN (ranked above +inf, as torch.topk
does); the sparse products must match dense matmuls within float tolerance; nothing may depend on the thread
count.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from saelab.kernels import native, native_library, native_screen

PORTABLE_FLAGS = tuple(f for f in native_library.FLAGS if f not in ("-march=native", "-mprefer-vector-width=512")) + (
    "-march=x86-64-v2",
)


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):
    if platform.machine() != "x86_64" or shutil.which("g++") is None:
        pytest.skip("the portable build is an x86-64 g++ build")
    return native_library.bind(native_library.compile_kernels(shutil.which("g++"), PORTABLE_FLAGS))


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    """Which compiled library the wrappers call."""
    if request.param == "native":
        assert native.library() is not None, "g++ is on this machine, so the kernels must build"
    else:
        lib = request.getfixturevalue("portable_library")
        monkeypatch.setattr(native_library, "_load", lambda: lib)
    return request.param


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim by value descending, ties by index ascending, NaN first (torch.topk's rank)."""
    keyed = torch.where(scores.isnan(), torch.full_like(scores, float("inf")), scores)
    nan_first = scores.isnan().to(torch.int8)
    order = keyed.sort(dim=-1, descending=True, stable=True).indices
    return order.gather(-1, nan_first.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)


def scores_with_ties_and_nan(rows: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(rows, width, generator=g)
    scores[1] = torch.randint(0, 3, (width,), generator=g).float()  # mostly ties
    scores[2, 5] = float("nan")
    scores[3] = -torch.rand(width, generator=g)  # all negative
    return scores


@pytest.mark.parametrize(("width", "k"), [(3072, 32), (60, 4), (17, 17), (40, 1), (100, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_topk_is_exact(build, width, k, with_bias):
    scores = scores_with_ties_and_nan(6, width)
    bias = torch.linspace(-0.5, 0.5, width) if with_bias else None
    ids, values = native.row_topk(scores, k, bias)
    full = scores + bias if with_bias else scores
    expected = ranked(full)[:, :k].sort(-1).values
    assert torch.equal(ids, expected)  # ascending column order, the same set as the reference ranking
    torch.testing.assert_close(values, full.gather(1, ids), rtol=0, atol=0, equal_nan=True)


def test_row_topk_reads_rows_with_a_stride(build):
    scores = torch.randn(8, 50)
    ids, values = native.row_topk(scores[:, 5:45], 6)  # rows 50 apart, 40 wide
    assert torch.equal(ids, scores[:, 5:45].topk(6).indices.sort(-1).values)


@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_topk_is_exact(build, with_bias):
    scores = scores_with_ties_and_nan(40, 96)
    bias = torch.linspace(-1, 1, 96) if with_bias else None
    full = (scores + bias if with_bias else scores).flatten()
    for keep in (1, 40 * 4, 40 * 96):
        ids, values = native.batch_topk(scores, keep, bias)
        assert torch.equal(ids, ranked(full)[:keep].sort().values)
        assert torch.allclose(values, full[ids], equal_nan=True)


def test_batch_topk_is_exact_when_its_sample_misleads_it(build):
    """The cutoff comes from a sample of 4,096 runs of 16 entries at hashed positions; if the sampled entries
    are the largest, fewer than `keep` entries reach it, and the kernel must retry with lower cutoffs (down to
    every entry)."""
    rows, width = 256, 1024
    n = rows * width
    starts = (torch.arange(1 << 12, dtype=torch.int64) * 2654435761) % (n // 16) * 16
    sampled = (starts.unsqueeze(1) + torch.arange(16)).flatten()
    scores = torch.randn(n)
    scores[sampled] = 100 + torch.rand(sampled.numel())
    for keep in (8192, 70_000):  # a lower cutoff suffices; only every entry does
        ids, _ = native.batch_topk(scores.view(rows, width), keep)
        assert torch.equal(ids, ranked(scores)[:keep].sort().values)


def test_group_by_is_a_stable_sort(build):
    ids = torch.randint(0, 50, (1000,))
    ids[:3] = 49
    order, offsets = native.group_by(ids, 60)
    assert torch.equal(order, ids.argsort(stable=True))
    counts = torch.bincount(ids, minlength=60)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 sums of up to 384 products of unit-scale numbers, in another order than torch's."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def sparse_case(d: int, rows: int = 40, d_sae: int = 70, seed: int = 0):
    """A sparse [rows, d_sae] Z with 0-9 entries per row (some rows empty), grouped by row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 10, (rows,), generator=g)
    counts[3] = 0
    row_of = torch.arange(rows).repeat_interleave(counts)
    cols = torch.cat([torch.randperm(d_sae, generator=g)[:c] for c in counts.tolist()])
    values = torch.randn(cols.numel(), generator=g)
    dense_z = torch.zeros(rows, d_sae).index_put_((row_of, cols), values)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return row_of, cols, values, offsets, dense_z


@pytest.mark.parametrize("d", [384, 20, 130, 7])
def test_sparse_products_equal_dense_matmuls(build, d):
    row_of, cols, values, offsets, z = sparse_case(d)
    table = torch.randn(z.shape[1], d)
    dense = torch.randn(z.shape[0], d)
    bias = torch.randn(d)

    out, sq = native.sparse_decode(values, cols, offsets, table)[0], None
    close(out, z @ table)
    out, sq = native.sparse_decode(values, cols, offsets, table, bias=bias, minus=dense, row_sq=True)
    close(out, z @ table + bias - dense)
    close(sq, out.pow(2).sum(-1))

    close(native.sampled_dot(cols, offsets, table, dense), (dense @ table.t())[row_of, cols])

    order, col_offsets = native.group_by(cols, z.shape[1])
    product, sums = native.sparse_t_dense(order, col_offsets, row_of, values, dense, col_sums=True)
    close(product, z.t() @ dense)
    close(sums, z.sum(0))
    product, none = native.sparse_t_dense(order, col_offsets, row_of, values, dense, transposed=True)
    close(product, (z.t() @ dense).t())
    assert none is None
    shift = torch.randn(d)  # (dense - shift)^T Z without forming dense - shift
    product, _ = native.sparse_t_dense(order, col_offsets, row_of, values, dense, transposed=True, shift=shift)
    close(product, (z.t() @ (dense - shift)).t())


def block_mask(layers: int, group: int, step: int, suffix: bool) -> torch.Tensor:
    """[layers * group, layers * step]: 1 where latent j (of layer j // group) has a weight, written out from the
    CLT's definition (saes/cross_layer.py): its own layer's columns, and with suffix every later layer's too."""
    mask = torch.zeros(layers * group, layers * step)
    for j in range(layers * group):
        for layer in range(layers):
            if layer == j // group or (suffix and layer > j // group):
                mask[j, layer * step:(layer + 1) * step] = 1
    return mask


@pytest.mark.parametrize("step", [130, 20, 7, 128])
@pytest.mark.parametrize("suffix", [True, False])
def test_layer_spans_skip_the_zero_blocks_exactly(build, step, suffix):
    """With a span the products read a table's rows on their blocks alone (the rows are zero elsewhere: the
    results equal the dense products; sampled_dot reads exactly the span, so a row's values outside it are left
    out), and sparse_t_dense leaves the gradient's zero blocks at 0."""
    layers, group = 3, 24
    row_of, cols, values, offsets, z = sparse_case(layers * step, d_sae=layers * group)
    mask = block_mask(layers, group, step, suffix)
    span = native.LayerSpan(group, step, suffix)
    table = torch.randn(mask.shape) * mask
    dense = torch.randn(z.shape[0], layers * step)
    bias = torch.randn(layers * step)

    out, sq = native.sparse_decode(values, cols, offsets, table, bias=bias, minus=dense, row_sq=True, span=span)
    close(out, z @ table + bias - dense)
    close(sq, out.pow(2).sum(-1))
    outside = torch.randn(mask.shape) * (1 - mask)  # values no product may read
    close(native.sampled_dot(cols, offsets, table + outside, dense, span=span), (dense @ table.t())[row_of, cols])
    order, col_offsets = native.group_by(cols, z.shape[1])
    product, sums = native.sparse_t_dense(order, col_offsets, row_of, values, dense, col_sums=True, span=span)
    close(product, (z.t() @ dense) * mask)
    close(sums, z.sum(0))
    shift = torch.randn(layers * step)
    product, _ = native.sparse_t_dense(order, col_offsets, row_of, values, dense, transposed=True, shift=shift,
                                       span=span)
    close(product, ((z.t() @ (dense - shift)) * mask).t())


def test_results_do_not_depend_on_the_thread_count(build):
    row_of, cols, values, offsets, z = sparse_case(130, rows=200, d_sae=300)
    table, dense = torch.randn(300, 130), torch.randn(200, 130)
    scores = torch.randn(200, 300)
    order, col_offsets = native.group_by(cols, 300)
    screen = native.bf16_screen(*screen_case(200, 40, 300))

    def run():
        return (*native.row_topk(scores, 8), *native.batch_topk(scores, 1600),
                *native.sparse_decode(values, cols, offsets, table, minus=dense, row_sq=True),
                native.sampled_dot(cols, offsets, table, dense),
                native.sparse_t_dense(order, col_offsets, row_of, values, dense, transposed=True)[0],
                *native.screened_row_topk(screen, 8)[:2], *native.screened_batch_topk(screen, 1600)[:2])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_wrappers_decline_what_the_kernels_do_not_take(monkeypatch):
    scores = torch.randn(4, 10)
    assert native.row_topk(scores.double(), 2) is None
    assert native.row_topk(scores.t(), 2) is None  # columns not contiguous
    assert native.row_topk(scores, 11) is None  # k > width: torch.topk raises the error
    assert native.batch_topk(scores, 41) is None
    assert native.sparse_decode(torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.tensor([0, 2]),
                                torch.randn(3, 5), bias=torch.randn(4)) is None  # bias of the wrong width
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    assert native.library() is None and native.row_topk(scores, 2) is None


def test_without_a_compiler_training_falls_back_with_one_warning(monkeypatch):
    """No g++: a RuntimeWarning says why, and the torch operators run (tests/test_step_equivalence.py checks
    that path's values and gradients)."""
    script = textwrap.dedent("""
        import warnings, torch
        from saelab.kernels import native
        from saelab.saes.topk import per_token_topk
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows, ids, values = per_token_topk(torch.randn(4, 64), 3)
        assert native.library() is None
        assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
            "saelab: no C++ compiler (/nonexistent/g++); the CPU training kernels are off and torch operators run "
            "instead (slower)"]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CXX": "/nonexistent/g++"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_failed_build_falls_back_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_library, "FLAGS", ("-this-flag-does-not-exist",))
    native_library._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="building sparse_kernels.cpp failed"):
            assert native_library._load() is None
    finally:
        native_library._load.cache_clear()
    assert not any(p.suffix == ".so" for p in tmp_path.rglob("*"))


def screen_case(rows: int, d: int, width: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(rows, d, generator=g) / d**0.5
    W = torch.randn(d, width, generator=g)
    W = W / W.norm(dim=0) * (0.5 + torch.rand(width, generator=g))  # unequal column norms
    bias = 0.1 * torch.randn(width, generator=g)
    return x, W, bias


def exact_preacts(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (x.double() @ W.double() + bias.double()).float()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("worst_case", [False, True])
def test_screen_bound_holds(scale, worst_case):
    """|x.w_j + bias_j - (approx + bias_j)| <= the Screen's bound for every entry, at any scale (float64 truth).

    The worst case: x = [p..., q...] and w_j = [p..., -q...] with p = 1 + 0.49 * 2^-7 (bf16 rounds it down to 1)
    and q = 1 + 0.51 * 2^-7 (rounded up), so every product errs the same way, by ~2u |x_i w_i|, while the
    products cancel (approx is small, so its own rounding term cannot cover for the rest): the error reaches
    96% of the bound, and a bound 20% smaller fails here."""
    x, W, bias = screen_case(256, 384, 512, scale=scale)
    if worst_case:
        p, q = 1 + 0.49 * 2**-7, 1 + 0.51 * 2**-7
        half = x.shape[1] // 2
        x = torch.cat([torch.full((256, half), p), torch.full((256, half), q)], 1)
        x = x * 2.0 ** (round(math.log2(scale)) + torch.arange(-4, 4).repeat(32)[:, None])  # 2^n: exact in bf16
        W = torch.cat([torch.full((half, 512), p), torch.full((half, 512), -q)]) * 2.0 ** torch.arange(-8, 8).repeat(32)
        bias = torch.zeros_like(bias)
    screen = native.bf16_screen(x, W, bias)
    approx = screen.approx.float()
    truth = x.double() @ W.double()
    bound = (screen.row_a[:, None] * screen.col_a + screen.row_b[:, None] * screen.col_b
             + native_screen.REL_APPROX * approx.abs() + native_screen.REL_BIAS * bias.abs())
    assert ((approx.double() - truth).abs() <= bound.double()).all()
    if worst_case:  # tight: the error comes within 5% of the bound
        assert ((approx.double() - truth).abs() / bound.double()).max() > 0.95
    else:
        # measured rounding errors make it much narrower than the worst case, 2u |x| |w| (u = 2^-8)
        products = screen.row_a[:, None] * screen.col_a + screen.row_b[:, None] * screen.col_b
        assert (products / (x.norm(dim=1)[:, None] * W.norm(dim=0))).max() < 1.2 * native_screen.BF16_UNIT


@pytest.mark.parametrize(("rows", "d", "width", "k"), [(64, 384, 3072, 32), (20, 13, 37, 5), (9, 40, 17, 17),
                                                      (30, 64, 100, 1)])
def test_screened_topk_equals_the_float32_topk(build, rows, d, width, k):
    x, W, bias = screen_case(rows, d, width)
    screen = native.bf16_screen(x, W, bias)
    ids, values, candidates = native.screened_row_topk(screen, k)
    full = x @ W + bias
    assert torch.equal(ids, ranked(full)[:, :k].sort(-1).values)
    torch.testing.assert_close(values, full.gather(1, ids))
    assert rows * k <= candidates <= rows * width
    flat_ids, flat_values, _ = native.screened_batch_topk(screen, rows * k)
    assert torch.equal(flat_ids, ranked(full.flatten())[: rows * k].sort().values)
    torch.testing.assert_close(flat_values, full.flatten()[flat_ids])


def test_screened_topk_is_exact_below_bf16_resolution(build):
    """Columns that differ by less than bf16 can resolve (and exact duplicates, whose tie goes to the lower
    index): every entry is then a candidate, and the float32 values alone decide."""
    g = torch.Generator().manual_seed(1)
    rows, d, width, k = 16, 64, 256, 8
    x = torch.randn(rows, d, generator=g)
    W = torch.randn(d, 1, generator=g) + 1e-3 * torch.randn(d, width, generator=g)
    W[:, 1::2] = W[:, 0::2]  # exact duplicates
    bias = torch.zeros(width)
    screen = native.bf16_screen(x, W, bias)
    truth = x.double() @ W.double()
    ids, values, candidates = native.screened_row_topk(screen, k)
    assert candidates > rows * width // 2  # the screen could not tell them apart
    assert torch.equal(ids, ranked(truth)[:, :k].sort(-1).values)
    flat_ids, _, _ = native.screened_batch_topk(screen, rows * k)
    assert torch.equal(flat_ids, ranked(truth.flatten())[: rows * k].sort().values)


def test_screened_batch_topk_retries_when_its_sample_misleads_it(build):
    """The cutoff comes from lower bounds at hashed positions; if those entries are the largest, too few lower
    bounds reach it and the kernel must retry lower (here: down to every entry). x = I makes x W = W."""
    rows, width = 256, 1024
    n = rows * width
    sampled = (torch.arange(1 << 16, dtype=torch.int64) * 2654435761) % n
    W = torch.randn(n)
    W[sampled] = 100 + torch.rand(sampled.numel())
    W = W.view(rows, width)
    screen = native.bf16_screen(torch.eye(rows), W, torch.zeros(width))
    for keep in (70_000, 8192):  # every entry; a lower cutoff
        ids, values, _ = native.screened_batch_topk(screen, keep)
        assert torch.equal(ids, ranked(W.flatten())[:keep].sort().values)
        assert torch.equal(values, W.flatten()[ids])


def test_the_screen_declines_what_it_cannot_bound():
    x, W, bias = screen_case(4, 8, 16)
    assert native.bf16_screen(x.double(), W.double(), bias.double()) is None
    assert native.bf16_screen(x, W, bias[:3]) is None
    x[1, 2] = float("inf")
    assert native.bf16_screen(x, W, bias) is None
    x[1, 2] = float("nan")
    assert native.bf16_screen(x, W, bias) is None
    assert native.bf16_screen(x[:, :4], W[:4], torch.full_like(bias, float("nan"))) is None


@pytest.mark.parametrize("near_all", [False, True])
def test_jumprelu_forward_equals_torch(build, near_all):
    """f, the active count, the firing mask and the kernel window (rows, cols, triangle weights) of one pass
    equal the torch formulas. near_all: every entry in the window (more than the first buffer holds: a retry)."""
    g = torch.Generator().manual_seed(0)
    rows, m = (256, 1024) if near_all else (37, 100)
    pre = torch.randn(rows, m, generator=g)
    bias, theta = 0.1 * torch.randn(m, generator=g), 0.5 + 0.1 * torch.rand(m, generator=g)
    theta[3] = 50.0  # never fires
    width, scale = (10.0, 20.0) if near_all else (0.2, 0.4)
    out = torch.full_like(pre, float("nan"))
    active, fired, band_rows, band_cols, weights = native.jumprelu_forward(pre, bias, theta, width, scale, out)
    p = pre + bias
    shifted = p - theta
    assert torch.equal(out, torch.where(shifted > 0, p, 0.0))
    assert active == int((shifted > 0).sum()) and torch.equal(fired, (out > 0).any(0)) and not fired[3]
    expected_rows, expected_cols = (shifted.abs() < width).nonzero(as_tuple=True)
    assert torch.equal(band_rows, expected_rows) and torch.equal(band_cols, expected_cols)
    assert band_rows.numel() > (pre.numel() // 16 if near_all else 0)
    torch.testing.assert_close(weights, 1 - shifted.abs()[expected_rows, expected_cols] / scale)


@pytest.mark.parametrize("width", [100, 48])
def test_gated_passes_equal_torch(build, width):
    """The Gated SAE's three elementwise passes against the torch formulas (widths with and without a tail)."""
    g = torch.Generator().manual_seed(0)
    rows = 37
    z, grad_f, grad_gate = (torch.randn(rows, width, generator=g) for _ in range(3))
    bias_gate, mag_shift = 0.3 * torch.randn(width, generator=g), 0.3 * torch.randn(width, generator=g)
    gain = torch.rand(width, generator=g) + 0.5
    bias_gate[5] = -100.0  # latent 5 never fires
    gate, pi_mag, f = (torch.full_like(z, float("nan")) for _ in range(3))
    total, fired = native.gated_forward(z, bias_gate, gain, mag_shift, gate, pi_mag, f)
    expected_gate = (z + bias_gate).relu()
    expected_mag = z * gain + mag_shift
    expected_f = torch.where(expected_gate > 0, expected_mag.relu(), 0.0)
    torch.testing.assert_close(gate, expected_gate)
    torch.testing.assert_close(pi_mag, expected_mag)
    torch.testing.assert_close(f, expected_f)
    assert torch.equal(fired, (f > 0).any(0)) and not fired[5]
    assert total == pytest.approx(float(expected_gate.double().sum()), rel=1e-6)

    g_mag = grad_f.clone()
    sum_g, sum_pg = native.gated_backward_mag(g_mag, f, pi_mag, gain)
    masked = torch.where(f > 0, grad_f, 0.0)
    torch.testing.assert_close(sum_g, masked.sum(0))
    torch.testing.assert_close(sum_pg, (pi_mag * masked).sum(0))
    torch.testing.assert_close(g_mag, masked * gain)

    g_z = g_mag.clone()
    sums = native.gated_backward_gate(grad_gate, gate, g_z)
    gate_term = torch.where(gate > 0, grad_gate, 0.0)
    torch.testing.assert_close(sums, gate_term.sum(0))
    torch.testing.assert_close(g_z, g_mag + gate_term)
