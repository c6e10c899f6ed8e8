"""Training-step throughput of each SAE variant against the matmul roofline measured in the same run.

    python benchmarks/train_step.py --variant relu --d-sae 3072 --batch 4096 [--d-in 384] [--acts PATH]
        [--steps 30] [--warmup 5] [--json OUT] [SAE overrides, e.g. k=64]

Each step runs exactly what SAEModule runs per step (SAEMember.step_loss: the SAE's training loss and the
dead-latent bookkeeping; backward; before_optimizer_step, i.e. the decoder-gradient projection; Adam's step;
after_optimizer_step, i.e. renormalisation / threshold projection), minus logging I/O.

FLOPs counted: 2 x B x d_in x d_sae per dense matmul pass, forward and backward (what actually runs):
  relu, jumprelu  5 passes: encoder fwd, dW_enc; decoder fwd, dW_dec, df. b_dec is folded into the encoder
                  bias (x W_enc + b_enc - b_dec W_enc), so no pass computes a gradient for the centred input
  gated           7 passes: the relu five (gate and magnitude share one encoder matmul, and their latent
                  gradients are summed before the one dW_enc) plus L_aux's decoder forward and its input
                  gradient (the decoder is frozen there, so no weight gradient)
  topk, batchtopk 1 pass: the encoder forward. The decoder is sparse (k of d_sae latents: fwd, dW_dec, df)
                  and so is the encoder backward (dW_enc from the B k selected entries only), 4 x 2 B k d_in
                  FLOPs, counted as such (AuxK's sparse work is not counted). matryoshka_batchtopk: the same
                  (its levels decode disjoint bands of the B k entries; the M passes over [B, d_in] that sum
                  them are not counted)
The roofline is the GFLOP/s of those same matmul shapes run back to back with preallocated outputs, on this
machine, in this run: one pass over them is timed just before every measured step, and roofline_fraction is
the median over steps of (the step's GFLOP/s) / (the GFLOP/s of the roofline pass just before it), with the
range over steps beside it. Pairing each step with its own roofline pass cancels this VM's speed drift, which
reaches 10-30% within a minute at times. `roofline_gflops` is the median roofline pass.

For TopK/BatchTopK the selection (a per-token or batch-wide top-k over B x d_sae pre-activations) and the
sparse products are not matmuls (they run as saes/native.py's C++ kernels when g++ is present;
`native_kernels` in the JSON says whether they did), so roofline_fraction mostly measures how much of the
step they take. On CPUs with bf16 dot products (AVX512_BF16, AMX) their encoder pass runs, by default, as a
bf16 matmul screen followed by exact float32 values for the candidates (sae.bf16_screen; the same latents as
the float32 matmul): the FLOPs counted and the roofline stay float32's, so the fraction can pass 100%.
`bf16_screen` in the JSON says whether the screen ran, `screen_candidates_per_token` how many exact values it
computed per token, and `bf16_roofline_gflops` is the bf16 matmul's rate on the encoder shape in this run;
pass the override bf16_screen=false for the float32-only step. The JSON also gives
dense_equivalent_fraction = (time a dense 5-pass step would take at the 5-pass roofline) / (measured step
time): above 1 means the sparse step is faster than any dense implementation could be on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saelab.module import SAEModule
from saelab.saes import build_sae, native

CONF = Path(__file__).resolve().parents[1] / "conf"
LOG_EVERY_N_STEPS = 10  # conf/trainer/default.yaml: L0 is computed on logging steps only, as in training
DENSE_PASSES = {"relu": 5, "jumprelu": 5, "gated": 7, "topk": 1, "batchtopk": 1, "matryoshka_batchtopk": 1}
SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")  # one dense pass; the decoder side is sparse


def build(variant: str, d_in: int, d_sae: int, overrides: list[str]):
    """The variant's SAE as conf/sae/<variant>.yaml composes it (defaults lists included), with overrides."""
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"sae={variant}", f"sae.d_in={d_in}", f"sae.d_sae={d_sae}",
                                          *(f"sae.{o}" for o in overrides)])
    return build_sae(OmegaConf.to_container(cfg.sae, resolve=True))


def step_flops(variant: str, sae, batch: int) -> float:
    dense = DENSE_PASSES[variant] * 2.0 * batch * sae.d_in * sae.d_sae
    if variant in SPARSE:
        dense += 4 * 2.0 * batch * int(sae.cfg.k) * sae.d_in
    return dense


class Roofline:
    """The step's dense matmul shapes (forward and backward), run back to back with preallocated outputs; in
    float32, or in another dtype (bfloat16: the rate of the bf16 screen's encoder matmul)."""

    def __init__(self, variant: str, batch: int, d_in: int, d_sae: int, dtype: torch.dtype = torch.float32):
        x, f = torch.randn(batch, d_in, dtype=dtype), torch.randn(batch, d_sae, dtype=dtype)
        w_enc, w_dec = torch.randn(d_in, d_sae, dtype=dtype), torch.randn(d_sae, d_in, dtype=dtype)
        out_f, out_x = torch.empty(batch, d_sae, dtype=dtype), torch.empty(batch, d_in, dtype=dtype)
        out_we, out_wd = torch.empty(d_in, d_sae, dtype=dtype), torch.empty(d_sae, d_in, dtype=dtype)
        self.shapes = [
            lambda: torch.mm(x, w_enc, out=out_f),  # encoder forward
            lambda: torch.mm(x.t(), f, out=out_we),  # dW_enc
            lambda: torch.mm(f, w_dec, out=out_x),  # decoder forward
            lambda: torch.mm(f.t(), x, out=out_wd),  # dW_dec
            lambda: torch.mm(x, w_dec.t(), out=out_f),  # df
            lambda: torch.mm(f, w_dec, out=out_x),  # aux decoder forward (gated)
            lambda: torch.mm(x, w_dec.t(), out=out_f),  # aux input gradient (gated)
        ][: DENSE_PASSES[variant]]
        self.flops = len(self.shapes) * 2.0 * batch * d_in * d_sae
        self.run()  # warm-up

    def run(self) -> float:
        """Seconds for one pass over the shapes."""
        start = time.perf_counter()
        for fn in self.shapes:
            fn()
        return time.perf_counter() - start

    def gflops(self, repeats: int) -> float:
        return self.flops / statistics.median(self.run() for _ in range(repeats)) / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(DENSE_PASSES), default="relu")
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--acts", type=Path, help="float32 tensor [N, d_in] saved with torch.save")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="SAE config overrides, e.g. k=64 aux_loss=none")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.acts:
        acts = torch.load(args.acts, weights_only=True).float()
        d_in = acts.shape[1]
    else:  # synthetic, roughly the scale of normalised activations (E||x||^2 = 1)
        d_in = args.d_in
        acts = torch.randn(max(4 * args.batch, 16384), d_in) / d_in**0.5
    sae = build(args.variant, d_in, args.d_sae, args.overrides)
    optim_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "adam.yaml")) | {"lr": 1e-4}
    module = SAEModule.single(sae, optim_cfg, max_steps=args.steps, dead_window_tokens=10_000_000)
    optimizer = module.configure_optimizers()["optimizer"]  # the optimiser training uses (fused Adam)
    module.on_fit_start()  # what the Trainer calls first: the allocator setting training runs with
    coefficients = {name: value for name, (value, _) in sae.scheduled_coefficients.items()}

    # This VM's speed drifts (by 10-30% within a minute at times), so every measured step is paired with a
    # roofline pass timed just before it, and the fraction is the median of the per-pair fractions.
    roofline = Roofline(args.variant, args.batch, d_in, args.d_sae)
    flops = step_flops(args.variant, sae, args.batch)
    times, roofline_times, phases = [], [], {"forward": [], "backward": [], "optimizer": []}
    for step in range(args.warmup + args.steps):
        start_row = (step * args.batch) % (len(acts) - args.batch + 1)
        x = acts[start_row : start_row + args.batch]
        roofline_s = roofline.run()
        start = time.perf_counter()
        loss, _ = module.member.step_loss(x, coefficients, with_l0=(step + 1) % LOG_EVERY_N_STEPS == 0)
        optimizer.zero_grad(set_to_none=True)
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        sae.after_optimizer_step()
        end = time.perf_counter()
        if step >= args.warmup:
            times.append(end - start)
            roofline_times.append(roofline_s)
            for phase, seconds in zip(phases, (forward_end - start, backward_end - forward_end, end - backward_end),
                                      strict=True):
                phases[phase].append(seconds)

    step_s = statistics.median(times)
    gflops = flops / step_s / 1e9
    fractions = [(flops / t) / (roofline.flops / r) for t, r in zip(times, roofline_times, strict=True)]
    result = {
        "variant": args.variant, "d_in": d_in, "d_sae": args.d_sae, "batch": args.batch,
        "threads": torch.get_num_threads(), "native_kernels": native.library() is not None,  # TopK's C++ kernels
        "ms_per_step": 1e3 * step_s, "tokens_per_s": args.batch / step_s,
        "gflops": gflops, "roofline_gflops": roofline.flops / statistics.median(roofline_times) / 1e9,
        "roofline_fraction": statistics.median(fractions),
        "roofline_fraction_range": [min(fractions), max(fractions)],  # over the step/roofline pairs
        # Medians of the step's phases: the loss (forward, with bookkeeping), backward, and the optimiser phase
        # (decoder-gradient projection, Adam, renormalisation), which any implementation of the step pays.
        **{f"{phase}_ms": 1e3 * statistics.median(seconds) for phase, seconds in phases.items()},
    }
    if args.variant in SPARSE:
        candidates = getattr(sae, "screen_candidates_per_token", None)
        result["bf16_screen"] = candidates is not None
        result["screen_candidates_per_token"] = candidates
        bf16 = Roofline(args.variant, args.batch, d_in, args.d_sae, dtype=torch.bfloat16)  # the encoder shape
        result["bf16_roofline_gflops"] = bf16.gflops(max(5, args.steps // 2))
        dense = Roofline("relu", args.batch, d_in, args.d_sae)
        dense_step_s = dense.flops / (dense.gflops(max(5, args.steps // 2)) * 1e9)
        result["dense_equivalent_fraction"] = dense_step_s / step_s
    print(f"{args.variant:>9} d_in {d_in} d_sae {args.d_sae} batch {args.batch}: {result['ms_per_step']:.1f} ms/step, "
          f"{result['tokens_per_s']:,.0f} tok/s, {gflops:.1f} GFLOP/s of {result['roofline_gflops']:.1f} roofline; "
          f"fraction {100 * result['roofline_fraction']:.0f}% (median of {len(fractions)} step/roofline pairs, "
          f"range {100 * min(fractions):.0f}-{100 * max(fractions):.0f}%)"
          + (f"; {result['dense_equivalent_fraction']:.2f}x a dense step at the roofline"
             if "dense_equivalent_fraction" in result else "")
          + f"; phases (ms) forward {result['forward_ms']:.1f}, backward {result['backward_ms']:.1f}, "
            f"optimiser {result['optimizer_ms']:.1f}"
          + ("" if result["native_kernels"] or args.variant not in SPARSE
             else "; native kernels OFF")
          + (f"; bf16 screen ON ({result['screen_candidates_per_token']:.1f} exact values per token; bf16 matmul "
             f"{result['bf16_roofline_gflops']:.1f} GFLOP/s)" if result.get("bf16_screen") else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
