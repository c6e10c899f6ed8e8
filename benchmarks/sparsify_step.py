"""sparsify's (EleutherAI) TopK training step, timed like benchmarks/train_step.py times saelab's (issue #14).

Like saelens_step.py, it runs only where eai-sparsify imports, never in saelab's environment, e.g.:

    python -m venv /tmp/spvenv && /tmp/spvenv/bin/pip install torch==2.13.0 eai-sparsify
    /tmp/spvenv/bin/python -m benchmarks.sparsify_step [--d-in 384 --d-sae 3072 --batch 4096 --k 32]
        [--device cpu|cuda] [--json OUT]

Each step is the body of sparsify's Trainer.fit (1.3) for one SAE with loss_fn "fvu" and optimizer "adam" (its
torch.optim.Adam fallback when bitsandbytes is absent): the decoder renormalised, the forward with the dead
mask and the batch's total variance (AuxK when latents are dead), the firing mask and the float(fvu) it logs,
backward of fvu + auxk_alpha * auxk_loss, the decoder-gradient projection, Adam's step, zero_grad, and the
dead-latent counters. sparsify's forward runs under its own bfloat16 autocast on CUDA (a decorator on
SparseCoder.forward), so on a GPU its precision is bf16 whatever one asks; on the CPU it is float32 (TF32 off
either way for the rest); its sparse decoder is its Triton kernel on a GPU, embedding_bag on the CPU. Data: the
same synthetic activations as train_step.py (randn / sqrt(d_in), seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cuda_timing import device_name, matmul_precision, median_step_seconds, synthetic_activations

AUXK_ALPHA = 1 / 32  # sparsify's TrainConfig default
DEAD_FEATURE_THRESHOLD = 10_000_000  # sparsify's TrainConfig default, in tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    try:
        with matmul_precision("fp32"):
            return run(args)
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":  # its Triton decoder needs a GPU; sparsify reads this switch when first imported
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    acts = synthetic_activations(args.batch, args.d_in, device)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=device,
                      dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.d_sae / 2**14) ** 0.5)  # sparsify's default
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=device)
    did_fire = torch.zeros(args.d_sae, dtype=torch.bool, device=device)

    def step(x: torch.Tensor, index: int) -> None:
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_FEATURE_THRESHOLD
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer's avg_fvu bookkeeping: a host sync every step
        (out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired.add_(args.batch)
            since_fired[did_fire] = 0
            did_fire.zero_()

    step_s = median_step_seconds(acts, args.batch, args.warmup, args.steps, step)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    result = {"library": "sparsify", "variant": "topk", "d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch,
              "k": args.k, "device": device.type, "gpu": device_name(device), "precision": "bf16" if bf16 else "fp32",
              "ms_per_step": 1e3 * step_s, "tokens_per_s": args.batch / step_s, "steps": args.steps}
    print(f"sparsify topk d_in {args.d_in} d_sae {args.d_sae} batch {args.batch} {device.type} {result['precision']}: "
          f"{1e3 * step_s:.1f} ms/step, {args.batch / step_s:,.0f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
