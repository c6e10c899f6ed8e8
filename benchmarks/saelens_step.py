"""SAELens's training step, timed like benchmarks/train_step.py times saelab's (for the #7 and #14 comparisons).

SAELens pins transformer-lens < 4, so it never goes into saelab's environment. Run this file with a
throwaway venv's Python, from the repository root, e.g.:

    python -m venv /tmp/slvenv && /tmp/slvenv/bin/pip install torch==2.13.0 sae-lens
    /tmp/slvenv/bin/python -m benchmarks.saelens_step --variant standard [--d-sae 3072 --batch 4096 --d-in 384]
        [--device cpu|cuda] [--precision fp32|bf16] [--json OUT]

Each step is the body of SAELens's SAETrainer._train_step (6.54): training_forward_pass and the firing
bookkeeping (both inside the trainer's autocast when it has one), backward, clip_grad_norm_(1.0), Adam step,
zero_grad. --precision bf16 is that autocast (SAETrainer's `autocast=True`: torch.autocast(bfloat16)); fp32
runs float32 with TF32 off. On --device cuda the data sits on the GPU and each step is timed with CUDA events
read after the timed region, as train_step.py does. Data: the same synthetic activations as train_step.py
(randn / sqrt(d_in), seed 0). Prints ms/step and tokens/s (median of the timed steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cuda_timing import device_name, matmul_precision, median_step_seconds, synthetic_activations

VARIANTS = {
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {"l1_coefficient": 5.0}, {"l1": 5.0}),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {"l1_coefficient": 5.0}, {"l1": 5.0}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"l0_coefficient": 1.0}, {"l0": 1.0}),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 32}, {}),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="standard")
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: SAETrainer's autocast (torch.autocast bfloat16 around the forward)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    try:
        with matmul_precision(args.precision):
            return run(args)
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    acts = synthetic_activations(args.batch, args.d_in, device)
    cls, cfg_cls, cfg_kwargs, coefficients = VARIANTS[args.variant]
    sae = cls(cfg_cls(d_in=args.d_in, d_sae=args.d_sae, device=str(device), **cfg_kwargs)).to(device)
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(args.d_sae, device=device)
    act_freq = torch.zeros(args.d_sae, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def step(x: torch.Tensor, index: int) -> None:
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                           dead_neuron_mask=since_fired > 1e9, n_training_steps=index,
                                                           is_logging_step=False))
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
                act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step_s = median_step_seconds(acts, args.batch, args.warmup, args.steps, step)
    result = {"library": "sae_lens", "variant": args.variant, "d_in": args.d_in, "d_sae": args.d_sae,
              "batch": args.batch, "device": device.type, "gpu": device_name(device), "precision": args.precision,
              "ms_per_step": 1e3 * step_s, "tokens_per_s": args.batch / step_s, "steps": args.steps}
    print(f"SAELens {args.variant} d_in {args.d_in} d_sae {args.d_sae} batch {args.batch} {device.type} "
          f"{args.precision}: {1e3 * step_s:.1f} ms/step, {args.batch / step_s:,.0f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
