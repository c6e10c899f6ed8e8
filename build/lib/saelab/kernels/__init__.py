"""The training step's kernels, apart from the variants' maths: fused autograd Functions (fused_relu.py,
fused_gated.py, reconstruction.py, sparse_products.py) and top-k selections (selection.py) whose elementwise and
sparse work runs as C++ on the CPU (native.py), Triton on CUDA (triton_gpu.py) or torch operators, as
dispatch.py decides from the tensors. A variant that calls none of them runs on autograd."""
