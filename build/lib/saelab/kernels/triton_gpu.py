"""The training step's GPU kernels, in Triton: the launchers kernels/dispatch.py's triton_kernels() hands out, in one
namespace (fused_relu.py, fused_gated.py and sparse_products.py call them through it).

    triton_dense.py   the elementwise work between the matmuls (ReLU, JumpReLU, Gated)
    triton_sparse.py  the sparse products of TopK/BatchTopK
    triton_tiles.py   tile sizes, launch grids and the safety rules every kernel keeps (64-bit offsets, the wide
                      dimension on grid axis 0, NaN kept, deterministic sums when asked)

Each is one pass that reads and writes every byte once and never synchronises with the host. Every kernel also
runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported), which is
how tests/test_triton_kernels.py checks them against the torch reference in CI.
"""

from __future__ import annotations

from saelab.kernels.triton_dense import (
    gated_backward_gate,
    gated_backward_mag,
    gated_forward,
    jumprelu_backward,
    jumprelu_forward,
    relu_forward,
)
from saelab.kernels.triton_sparse import sampled_dot, sparse_decode, sparse_t_dense

__all__ = ["gated_backward_gate", "gated_backward_mag", "gated_forward", "jumprelu_backward", "jumprelu_forward",
           "relu_forward", "sampled_dot", "sparse_decode", "sparse_t_dense"]
