"""SAELens's training step, timed like benchmarks/train_step.py times saelab's (for the #7 comparison).

SAELens pins transformer-lens < 4, so it never goes into saelab's environment. Run this file with a
throwaway venv's Python, e.g.:

    python -m venv /tmp/slvenv && /tmp/slvenv/bin/pip install torch==2.13.0 sae-lens
    /tmp/slvenv/bin/python benchmarks/saelens_step.py --variant standard [--d-sae 3072 --batch 4096 --d-in 384]

Each step is the body of SAELens's SAETrainer._train_step (6.54): training_forward_pass, the firing
bookkeeping, backward, clip_grad_norm_(1.0), Adam step, zero_grad. Data: the same synthetic activations as
train_step.py (randn / sqrt(d_in), seed 0). Prints ms/step and tokens/s (median of the timed steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

VARIANTS = {
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {"l1_coefficient": 5.0}, {"l1": 5.0}),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {"l1_coefficient": 5.0}, {"l1": 5.0}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"l0_coefficient": 1.0}, {"l0": 1.0}),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 32}, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="standard")
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    acts = torch.randn(max(4 * args.batch, 16384), args.d_in) / args.d_in**0.5
    cls, cfg_cls, cfg_kwargs, coefficients = VARIANTS[args.variant]
    sae = cls(cfg_cls(d_in=args.d_in, d_sae=args.d_sae, **cfg_kwargs))
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(args.d_sae)
    act_freq = torch.zeros(args.d_sae)
    times = []
    for step in range(args.warmup + args.steps):
        start_row = (step * args.batch) % (len(acts) - args.batch + 1)
        x = acts[start_row : start_row + args.batch]
        start = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                       dead_neuron_mask=since_fired > 1e9, n_training_steps=step,
                                                       is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired += 1
            since_fired[did_fire] = 0
            act_freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    print(f"SAELens {args.variant} d_in {args.d_in} d_sae {args.d_sae} batch {args.batch}: "
          f"{1e3 * step_s:.1f} ms/step, {args.batch / step_s:,.0f} tok/s")


if __name__ == "__main__":
    main()
