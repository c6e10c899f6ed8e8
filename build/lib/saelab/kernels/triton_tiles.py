"""What every Triton kernel of the training step shares: tile sizes, launch grids, the tile of a [B, d_sae] matrix a
program owns, where its float sums go, and a NaN-keeping ReLU (the kernels are triton_dense.py's and
triton_sparse.py's; kernels/triton_gpu.py hands their launchers out).

These helpers carry the rules that keep the kernels safe at every shape the step accepts
(tests/test_triton_kernels.py checks each rule on the compiled kernels):

* offsets are 64-bit: every index is widened to int64 before it is multiplied by a row length, so
  B x d_sae or d_sae x d_in above 2^31 addresses the right element;
* the wide dimension (d_sae, tokens, latents) is on grid axis 0 (2^31 - 1 programs); axes 1 and 2 stop at 65,535;
* NaN stays NaN: ReLU and the threshold are written so that an unordered comparison yields NaN (tl.maximum and
  `p > theta` alone would turn it into 0 and hide it from the deferred finite check);
* under torch.use_deterministic_algorithms (trainer.deterministic=true) float sums are written per program and
  reduced by torch in a fixed order; otherwise they are float atomics (faster, order-dependent in the last bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 32  # rows of a [B, d_sae] tile per program (the column sums reduce over these first)
BLOCK_COLS = 128  # columns of a tile: one 512-byte float32 row segment per warp-wide load
BLOCK_D = 128  # the dense dimension (d_in or d_out) handled per program in the sparse kernels
BLOCK_ENTRIES = 32  # sparse entries gathered at once (sampled_dot, and each step of the sparse products' loops)
MAX_GRID_YZ = 65_535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1)


def deterministic() -> bool:
    """Whether float sums must not depend on scheduling (torch.use_deterministic_algorithms, which Lightning's
    trainer.deterministic=true turns on)."""
    return torch.are_deterministic_algorithms_enabled()


def grid(axis0: int, axis1: int = 1) -> tuple[int, int]:
    """A launch grid, refused by name where CUDA would refuse it (no launch, or a launch that covers too little)."""
    if axis1 > MAX_GRID_YZ:
        raise ValueError(f"Triton grid axis 1 = {axis1} exceeds CUDA's {MAX_GRID_YZ}: put the wide axis first")
    return axis0, axis1


def tile_grid(shape: torch.Size) -> tuple[int, int]:
    """[B, d_sae] tiles: column blocks on axis 0 (d_sae up to 2^38), row blocks on axis 1 (B up to ~2M)."""
    return grid(triton.cdiv(shape[1], BLOCK_COLS), triton.cdiv(shape[0], BLOCK_ROWS))


def column_partials(shape: torch.Size, device: torch.device, exact: bool) -> Tensor:
    """Where a tile kernel adds its column sums: one row per row block (reduced by torch in a fixed order) when
    the run must be deterministic, else one row that every program adds to atomically."""
    return torch.zeros(triton.cdiv(shape[0], BLOCK_ROWS) if exact else 1, shape[1], dtype=torch.float32,
                       device=device)


def scalar_partials(shape: torch.Size, device: torch.device, exact: bool) -> Tensor:
    """A tile kernel's scalar float sum: one slot per program when deterministic, else one atomic slot."""
    n = triton.cdiv(shape[0], BLOCK_ROWS) * triton.cdiv(shape[1], BLOCK_COLS) if exact else 1
    return torch.zeros(n, dtype=torch.float32, device=device)


@triton.jit
def tile(n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """This program's tile: rows, columns (int64: rows * n_cols can pass 2^31), flat offsets, masks."""
    rows = tl.program_id(1).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, rows[:, None] * n_cols + cols[None, :], mask, cols < n_cols


@triton.jit
def add_columns(ptr, cols, values, col_ok, n_cols, EXACT: tl.constexpr):
    """Column sums of a tile into column_partials' buffer: this row block's own row, or atomically."""
    if EXACT:
        tl.store(ptr + tl.program_id(1).to(tl.int64) * n_cols + cols, values, mask=col_ok)
    else:
        tl.atomic_add(ptr + cols, values, mask=col_ok)


@triton.jit
def add_scalar(ptr, value, EXACT: tl.constexpr):
    """A tile's scalar sum into scalar_partials' buffer: this program's slot, or atomically."""
    if EXACT:
        tl.store(ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)), value)
    else:
        tl.atomic_add(ptr, value)


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN (tl.maximum returns the other operand, as fmax does)."""
    return tl.where(x <= 0.0, 0.0, x)


def reduce_partials(partials: Tensor) -> Tensor:
    """Partial sums along dim 0 (a fixed-order torch reduction), or the one atomic row as it is."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)
