"""kernels/triton_gpu.py without a GPU: each kernel against a torch transcription of its contract (in Triton's
interpreter, on shapes with tails), and each kernel compiled for Hopper (sm_90: Triton's own compiler and ptxas
build the cubin on the CPU), so a kernel the interpreter accepts but the compiler rejects fails here, not on the
first GPU. tests/test_step_equivalence.py checks the whole steps on these kernels against the SPEC."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from saelab.kernels import dispatch
from saelab.kernels.sparse_products import csr_offsets
from saelab.saes import build_sae
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not installed")
B, M = 37, 300  # rows and columns that fill no block exactly


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def tk(request):
    """The kernels, once with float atomics and once as trainer.deterministic=true runs them (per-program
    partial sums reduced by torch)."""
    if not torch.cuda.is_available():
        assert dispatch.interpreting(), "conftest sets TRITON_INTERPRET=1 without a GPU"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield dispatch.triton_kernels()
    torch.use_deterministic_algorithms(before)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_relu_forward(tk):
    pre, bias = _rand(B, M), 0.1 * _rand(M, seed=1)
    f = pre.clone()
    total, fired = tk.relu_forward(f, bias)
    torch.testing.assert_close(f, (pre + bias).relu())
    torch.testing.assert_close(total, (pre + bias).relu().sum(), rtol=1e-5, atol=1e-4)
    assert torch.equal(fired, ((pre + bias) > 0).any(0))


@pytest.mark.parametrize("kernel", ["rectangle", "triangle"])
def test_jumprelu_forward_and_backward(tk, kernel):
    pre, bias, theta = _rand(B, M), 0.1 * _rand(M, seed=1), 0.3 * _rand(M, seed=2)  # some thresholds <= 0
    p = pre + bias
    kept = pre.clone()
    f = torch.empty_like(pre)
    n_active, fired = tk.jumprelu_forward(kept, bias, theta, out=f)
    torch.testing.assert_close(kept, p)
    torch.testing.assert_close(f, torch.where(p > theta, p, 0.0))
    assert int(n_active) == int((p > theta).sum())
    assert torch.equal(fired, (torch.where(p > theta, p, 0.0) > 0).any(0))

    g_f, g_l0, eps = _rand(B, M, seed=3), torch.tensor(0.7), 0.4
    u = (p - theta) / eps
    window = (u.abs() < 0.5).float() if kernel == "rectangle" else (1 - u.abs()).clamp_min(0)
    # SPEC 3: d f/d theta = -(theta/eps) K(u), d H/d theta = -(1/eps) K(u); L0 = sum_i H / B.
    expected_theta = -(window * (theta * g_f + g_l0 / B)).sum(0) / eps
    g = g_f.clone()
    grad_theta = tk.jumprelu_backward(g, kept, theta, g_l0, eps, kernel, need_theta=True)
    torch.testing.assert_close(grad_theta, expected_theta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_f * (p > theta))
    only_l0 = tk.jumprelu_backward(None, kept, theta, g_l0, eps, kernel, need_theta=True)
    torch.testing.assert_close(only_l0, -(window * g_l0 / B).sum(0) / eps, atol=1e-6, rtol=1e-5)


def test_gated_passes(tk):
    z, bias_gate, gain, shift = _rand(B, M), 0.2 * _rand(M, seed=1), _rand(M, seed=2).exp(), _rand(M, seed=3)
    gate, pi_mag, f = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    total, fired = tk.gated_forward(z, bias_gate, gain, shift, gate=gate, pi_mag=pi_mag, f=f)
    ref_gate = (z + bias_gate).relu()
    ref_mag = z * gain + shift
    ref_f = (ref_gate > 0) * ref_mag.relu()
    torch.testing.assert_close(gate, ref_gate)
    torch.testing.assert_close(pi_mag, ref_mag)
    torch.testing.assert_close(f, ref_f)
    torch.testing.assert_close(total, ref_gate.sum(), rtol=1e-5, atol=1e-4)
    assert torch.equal(fired, (ref_f > 0).any(0))

    g = _rand(B, M, seed=4)
    masked = g * (ref_f > 0)
    sum_g, sum_pg = tk.gated_backward_mag(g, f, pi_mag, gain)
    torch.testing.assert_close(g, masked * gain)
    torch.testing.assert_close(sum_g, masked.sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum_pg, (masked * ref_mag).sum(0), atol=1e-5, rtol=1e-5)

    g_gate, g_z = _rand(B, M, seed=5), _rand(B, M, seed=6)
    expected = g_z + g_gate * (ref_gate > 0)
    sums = tk.gated_backward_gate(g_gate, gate, g_z)
    torch.testing.assert_close(g_z, expected)
    torch.testing.assert_close(sums, (g_gate * (ref_gate > 0)).sum(0), atol=1e-5, rtol=1e-5)


def _sparse(batch=B, d_sae=M, k=5):
    """A sparse [batch, d_sae] matrix with k entries per row (row 3 empty), grouped by row, and it densely."""
    g = torch.Generator().manual_seed(7)
    counts = torch.full((batch,), k)
    counts[3] = 0
    rows = torch.arange(batch).repeat_interleave(counts)
    cols = torch.cat([torch.randperm(d_sae, generator=g)[:c] for c in counts.tolist()])
    values = torch.randn(rows.shape[0], generator=g)
    dense = torch.zeros(batch, d_sae).index_put_((rows, cols), values)
    return rows, cols, values, dense


def test_sparse_products(tk):
    rows, cols, values, Z = _sparse()
    width = 150  # past one BLOCK_D
    table, dense, bias, shift = _rand(M, width, seed=1), _rand(B, width, seed=2), _rand(width, seed=3), _rand(width)
    row_offsets = csr_offsets(rows, B)  # by binary search (the GPU path's: no bincount)
    assert torch.equal(row_offsets, torch.nn.functional.pad(torch.bincount(rows, minlength=B).cumsum(0), (1, 0)))
    out, sq = tk.sparse_decode(values, cols, row_offsets, table, bias, dense, row_sq=True)
    torch.testing.assert_close(out, Z @ table + bias - dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sq, (Z @ table + bias - dense).pow(2).sum(-1), atol=1e-4, rtol=1e-5)
    plain, none = tk.sparse_decode(values, cols, row_offsets, table)
    torch.testing.assert_close(plain, Z @ table, atol=1e-5, rtol=1e-5)
    assert none is None

    dots = tk.sampled_dot(rows, cols, table, dense)
    torch.testing.assert_close(dots, (dense @ table.t())[rows, cols], atol=1e-5, rtol=1e-5)

    order = cols.argsort(stable=True)  # SparsePattern's grouping off the CPU
    col_offsets = csr_offsets(cols[order], M)
    for transposed in (False, True):
        product, sums = tk.sparse_t_dense(order, col_offsets, rows, values, dense, transposed, True, shift)
        expected = Z.t() @ (dense - shift)
        torch.testing.assert_close(product, expected.t() if transposed else expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sums, Z.sum(0), atol=1e-6, rtol=1e-5)


COMPILE = textwrap.dedent(r'''
    import itertools, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from saelab.kernels import triton_dense as td, triton_sparse as ts, triton_tiles as tt

    tile = {"BR": tt.BLOCK_ROWS, "BC": tt.BLOCK_COLS}
    sparse = {"BE": tt.BLOCK_ENTRIES, "BD": tt.BLOCK_D}
    jobs = []  # (kernel, argument types, constexprs): sizes as i32, what Triton passes for values below 2^31
    for t, exact in itertools.product(("fp32",), (True, False)):  # the fused step runs in float32 (TF32 matmuls)
        p, x = "*" + t, {"EXACT": exact}
        jobs.append((td._relu_forward, [p, "*fp32", "*fp32", "*i32", "i32", "i32"], {**x, **tile}))
        jobs.append((td._jumprelu_forward, [p, "*fp32", "*fp32", p, "*i32", "*i32", "i32", "i32"], tile))
        for kernel, has_g, has_l0 in itertools.product((0, 1), (True, False), (True, False)):
            jobs.append((td._jumprelu_backward, [p, p, "*fp32", "*fp32", "*fp32", "i32", "i32", "fp32", "fp32"],
                         {"KERNEL": kernel, "HAS_G": has_g, "HAS_L0": has_l0, **x, **tile}))
        jobs.append((td._gated_forward, [p, "*fp32", "*fp32", "*fp32", p, p, p, "*fp32", "*i32", "i32", "i32"],
                     {**x, **tile}))
        jobs.append((td._gated_backward_mag, [p, p, p, "*fp32", "*fp32", "*fp32", "i32", "i32"], {**x, **tile}))
        jobs.append((td._gated_backward_gate, [p, p, p, "*fp32", "i32", "i32"], {**x, **tile}))
        for has_bias, has_minus, row_sq in itertools.product((True, False), repeat=3):
            jobs.append((ts._sparse_decode, [p, "*i64", "*i64", p, p, p, p, "*fp32", "i32"],
                         {"HAS_BIAS": has_bias, "HAS_MINUS": has_minus, "ROW_SQ": row_sq, **x, **sparse}))
        jobs.append((ts._sampled_dot, ["*i64", "*i64", p, p, p, "i32", "i32"], sparse))
        for has_shift, sums in itertools.product((True, False), repeat=2):
            jobs.append((ts._sparse_t_dense, ["*i64", "*i64", "*i64", p, p, p, p, p, "i32", "i32", "i32"],
                         {"HAS_SHIFT": has_shift, "SUMS": sums, **sparse}))

    def broken_rules(ttir: str, exact: bool) -> list[str]:
        """What the kernel's Triton IR does that is unsafe at some shape the step accepts."""
        found = []
        for line in ttir.splitlines():
            if "tt.addptr" in line and not re.search(r"(tensor<[0-9x]+xi64>|, i64)\s+loc", line):
                found.append("a 32-bit offset (overflows past 2^31 elements): " + line.strip()[:120])
            if re.search(r"arith\.(maxnumf|minnumf)", line):
                found.append("a max/min that drops NaN (use one that keeps it): " + line.strip()[:120])
            if exact and re.search(r"tt\.atomic_rmw (fadd|add).*f(32|16)", line):
                found.append("a float atomic under EXACT (order-dependent sum): " + line.strip()[:120])
        return found

    target = GPUTarget("cuda", 90, 32)
    problems = []
    for fn, types, constexprs in jobs:
        names = fn.arg_names
        signature = {n: ("constexpr" if n in constexprs else types[i]) for i, n in enumerate(names)}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert compiled.asm["cubin"], fn.__name__
        problems += [f"{fn.__name__} {constexprs}: {p}" for p in broken_rules(compiled.asm["ttir"],
                                                                               constexprs.get("EXACT", True))]
    print("\n".join(problems[:20]), file=sys.stderr)
    print(len(jobs), "kernels compiled for sm_90;", len(problems), "unsafe operations")
''')


def test_every_kernel_compiles_for_hopper_and_is_safe_at_every_shape():
    """Not in the interpreter: Triton's compiler lowers each kernel (float32 tensors, every constexpr
    combination) to PTX and ptxas assembles it for sm_90, the H100/H200. In the Triton IR of each, with sizes
    typed i32 as Triton passes them below 2^31: every pointer offset is 64-bit (an i32 product such as
    row * n_cols wraps once B x d_sae > 2^31 and writes outside the buffer), no max/min drops NaN, and the
    deterministic variants (EXACT) add no float atomically. Any kernel added later is held to the same rules."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels compiled for sm_90; 0 unsafe operations" in result.stdout, result.stderr[-3000:]


NAN_VARIANTS = {
    "relu": {"_target_": "saelab.saes.relu.ReluSAE"},
    "gated": {"_target_": "saelab.saes.gated.GatedSAE"},
    "jumprelu": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "bandwidth": 0.1},
    "jumprelu_triangle": {"_target_": "saelab.saes.jumprelu.JumpReLUSAE", "bandwidth": 0.1, "kernel": "triangle"},
}


@pytest.mark.parametrize("variant", sorted(NAN_VARIANTS))
def test_a_nan_in_the_encoder_reaches_the_loss(variant, monkeypatch):
    """A NaN in one column of W_enc makes that latent's pre-activation NaN on every row; torch's relu and
    p * H(p - theta) keep it, so the loss is NaN and the deferred finite check stops or skips the step. Kernels
    that turn NaN into 0 (fmax, `p > theta` alone) would leave the loss finite and the NaN unseen."""
    monkeypatch.setenv("SAELAB_KERNELS", "triton")
    torch.manual_seed(0)
    sae = build_sae({"d_in": 16, "d_sae": 64, "sparsity_coefficient": 0.1, **NAN_VARIANTS[variant]})
    with torch.no_grad():
        sae.W_enc[:, 5] = float("nan")
    terms = sae.training_loss(torch.randn(32, 16), {"sparsity": 0.1}).terms
    assert not torch.isfinite(sum(terms.values())), {k: float(v) for k, v in terms.items()}


def test_launch_grids_fit_cuda_at_the_widest_shapes(monkeypatch):
    """Every launcher's grid at 16,384 tokens x 2^24 latents and at 2^20 latents x d_in 2,304 (recorded, not run:
    meta tensors): CUDA caps grid axes 1 and 2 at 65,535, so the wide dimension must be on axis 0."""
    from saelab.kernels import triton_dense, triton_sparse
    from saelab.kernels import triton_gpu as tg

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, launch_grid):
            launches.append((self.name, tuple(launch_grid)))
            return lambda *args, **kwargs: None

    for name in ("_relu_forward", "_jumprelu_forward", "_jumprelu_backward", "_gated_forward", "_gated_backward_mag",
                 "_gated_backward_gate", "_sparse_decode", "_sampled_dot", "_sparse_t_dense"):
        monkeypatch.setattr(triton_sparse if name.startswith(("_sparse", "_sampled")) else triton_dense, name,
                            Recorder(name))
    meta = {"device": "meta"}
    batch, d_sae, d_in, k = 16_384, 2**24, 2_304, 32
    wide, row, entries = torch.empty(batch, d_sae, **meta), torch.empty(d_sae, **meta), batch * k
    tg.relu_forward(wide, row)
    tg.jumprelu_forward(wide, row, row, out=wide)
    tg.jumprelu_backward(wide, wide, row, torch.empty((), **meta), 0.1, "rectangle", need_theta=True)
    tg.gated_forward(wide, row, row, row, wide, wide, wide)
    tg.gated_backward_mag(wide, wide, wide, row)
    tg.gated_backward_gate(wide, wide, wide)
    ids, values = torch.empty(entries, dtype=torch.int64, **meta), torch.empty(entries, **meta)
    table, dense = torch.empty(2**20, d_in, **meta), torch.empty(batch, d_in, **meta)
    tg.sparse_decode(values, ids, torch.empty(batch + 1, dtype=torch.int64, **meta), table, row_sq=True)
    tg.sampled_dot(ids, ids, table, dense)
    tg.sparse_t_dense(ids, torch.empty(2**20 + 1, dtype=torch.int64, **meta), ids, values, dense, transposed=True)
    assert len(launches) == 9
    too_wide = [(name, g) for name, g in launches if any(axis > 65_535 for axis in g[1:])]
    assert too_wide == []
