"""Training-step throughput of each SAE variant against the matmul roofline measured in the same run.

    python -m benchmarks.train_step --variant relu --d-sae 3072 --batch 4096 [--d-in 384] [--acts PATH]
        [--steps 30] [--warmup 5] [--device cpu|cuda] [--precision fp32|tf32|bf16] [--reference] [--json OUT]
        [--lean] [--check-slice] [--sites S] [SAE overrides, e.g. k=64]

--clt L times a cross-layer transcoder over L layers of --d-in each with --d-sae latents in all (issue 37: MiniLM's
6 layers), and in the same run the L per-layer transcoders it replaces (--d-sae / L latents each; one is timed, the
set's time is L times its step). FLOPs are the CLT's useful ones (its L encoder blocks and L(L+1)/2 decoder blocks,
2 x B x d_in x (d_sae / L) per block and pass; the zero blocks it stores are not counted), and the roofline is
the per-layer matmul shape's rate. It prints clt_over_per_layer (the CLT's step time / the set's), the same ratio
of useful FLOPs (a dense variant's CLT has L(L+1)/2 decoder blocks to the set's L: 3.5x at L 6, 2.5x the step's
FLOPs, so it cannot come within 1.3x; TopK-family CLTs do the set's work, ~0.94x), and the CLT's roofline fraction
(a TopK-family step's is bounded by its selection, as the per-layer transcoder's beside it shows).

--sites S times a crosscoder over S sites of --d-in each (issue 36: 4 sites x 384 -> 3,072 latents): the step is
handed {site: tensor} and puts the sites side by side as SAEModule does, and the roofline is that of the same
matmuls at S x d_in (a crosscoder is an SAE over the sites' concatenation; the per-site decoder norms of its
penalty are not matmuls and are not counted).

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
time): above 1 means the sparse step is faster than any dense implementation could be on this machine (for a
CLT, a dense step over its useful blocks alone).

--precision: fp32 = float32 matmuls with TF32 off; tf32 = float32 parameters, TF32 matmuls; bf16 = the SAE
member's bf16 autocast (SAEMember(precision="bf16-mixed"), as trainer.precision=bf16-mixed trains). The roofline
runs in the dtype the step's matmuls run in (float32, TF32 or bfloat16). --device cuda (issue #14): the data
sits on the GPU, every mark is a CUDA event read after the timed region (nothing synchronises inside a step),
and the run also measures, on the same GPU and in the same process,
  - a plain hand-written autograd step of the same variant (benchmarks/reference_step.py), same dtype and
    autocast, with fused Adam and the unit-norm decoder: reference_tokens_per_s, reference_ratio (saelab's
    tokens/s over the reference's);
  - host synchronisations per non-logging step (with_l0=False, as SAEMember.step_loss runs between logging
    steps), counted with torch.profiler: syncs_per_step, sync_events; and by torch.cuda's sync debug mode:
    sync_warnings_per_step (cuda_timing.count_host_syncs);
  - which kernels ran: `kernels` = saelab.kernels.dispatch.backend_for(x), with SAELAB_KERNELS
    (auto | torch | triton) recorded as `saelab_kernels`.
--lean (the large shapes of issue #24: 16,384 tokens x 262,144 latents at d_in 2,304, ~66 GiB for JumpReLU; 2^20
latents at d_in 2,304) times saelab's step alone: no roofline pass, reference step or sync count (each would
need the step's memory again); the roofline fields are then null. --check-slice then recomputes a slice of one
step with plain torch where the offsets are largest (benchmarks/slice_check.py: the last tokens' latents; for
TopK/BatchTopK the highest selected latents' gradients) and reports slice_ok and its errors.
--reference asks for the reference and the sync count on the CPU too (off by default there, so the CPU figures
are timed as before). The CPU keeps its line and JSON keys; every run adds device, gpu, precision,
matmul_dtype, kernels, tflops, roofline_tflops and `summary`, the line CUDA (and --reference) runs print:
  relu 768x24576 b4096 cuda bf16: 1,234k tok/s  roofline 612 TFLOP/s  fraction 0.54  reference 812k tok/s (1.52x)
  syncs/step 0.0
"""


from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cuda_timing import (
    PRECISIONS,
    Clock,
    Roofline,
    count_host_syncs,
    device_name,
    matmul_dtype,
    matmul_precision,
)
from benchmarks.reference_step import ReferenceSAE, time_reference, unsupported
from benchmarks.slice_check import check_slice
from saelab.kernels import native
from saelab.run.compose import CONF_DIR, compose_run_config
from saelab.run.member import SAEMember
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from saelab.sites import Sites

LOG_EVERY_N_STEPS = 10  # conf/trainer/default.yaml: L0 is computed on logging steps only, as in training
DENSE_PASSES = {"relu": 5, "jumprelu": 5, "gated": 7, "topk": 1, "batchtopk": 1, "matryoshka_batchtopk": 1}
SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")  # one dense pass; the decoder side is sparse
MEMBER_PRECISION = {"fp32": "32-true", "tf32": "32-true", "bf16": "bf16-mixed"}  # TF32 is a global switch


def build(variant: str, d_in: int, d_sae: int, overrides: list[str]):
    """The variant's SAE as conf/sae/<variant>.yaml composes it (defaults lists included), with overrides."""
    cfg = compose_run_config([f"sae={variant}", f"sae.d_in={d_in}", f"sae.d_sae={d_sae}",
                              *(f"sae.{o}" for o in overrides)])
    return build_sae(OmegaConf.to_container(cfg.sae, resolve=True))


def step_flops(variant: str, sae, batch: int) -> float:
    dense = DENSE_PASSES[variant] * 2.0 * batch * sae.d_in * sae.d_sae
    if variant in SPARSE:
        dense += 4 * 2.0 * batch * int(sae.cfg.k) * sae.d_in
    return dense


def clt_flops(variant: str, sae, batch: int, layers: int) -> float:
    """A CLT's useful FLOPs: each pass over its L encoder blocks and L(L+1)/2 decoder blocks (per block 2 B d F)."""
    d, F = sae.d_in // layers, sae.d_sae // layers
    block, dec_blocks = 2.0 * batch * d * F, layers * (layers + 1) / 2
    if variant in SPARSE:  # the encoder forward; the decoder side's sparse products on the B k selected entries
        return layers * block + 4 * 2.0 * batch * int(sae.cfg.k) * d * (layers + 1) / 2
    enc_passes = 2
    return block * (enc_passes * layers + (DENSE_PASSES[variant] - enc_passes) * dec_blocks)


def kernels_backend(x: Tensor) -> str:
    """What saelab.kernels.dispatch.backend_for says runs the step's kernels for x ("native", "triton",
    "torch")."""
    from saelab.kernels.dispatch import backend_for

    try:
        return str(backend_for(x))
    except Exception as err:  # a report, not a reason to lose the run's figures
        return f"error: {type(err).__name__}: {err}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(DENSE_PASSES), default="relu")
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--sites", type=int, default=1,
                        help="a crosscoder over this many sites, each --d-in wide (batches {site: tensor}, as trained)")
    parser.add_argument("--clt", type=int, default=0, metavar="L",
                        help="a cross-layer transcoder over L layers, against the L per-layer transcoders it replaces")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--acts", type=Path, help="float32 tensor [N, d_in] saved with torch.save")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32: float32, TF32 off; tf32: TF32 matmuls; bf16: the member's bf16 autocast")
    parser.add_argument("--reference", action="store_true",
                        help="also time the hand-written reference step and count host syncs (always on CUDA)")
    parser.add_argument("--sync-steps", type=int, default=3, help="non-logging steps the sync count profiles")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lean", action="store_true",
                        help="saelab's step alone (no roofline, reference or sync count): the largest shapes")
    parser.add_argument("--check-slice", action="store_true",
                        help="check a slice of one step against plain torch (benchmarks/slice_check.py)")
    parser.add_argument("overrides", nargs="*", help="SAE config overrides, e.g. k=64 aux_loss=none")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        with matmul_precision(args.precision):
            if args.clt:
                return clt_comparison(args)
            return run(args)
    finally:
        if args.device == "cuda":  # in-process callers (benchmarks/gpu_check.py) run the next shape on a clean pool
            torch.cuda.empty_cache()


def clt_comparison(args: argparse.Namespace) -> dict:
    """The CLT's step and, in the same run, one per-layer transcoder's (the set of L costs L of them)."""
    clt = run(args)
    single = run(argparse.Namespace(**{**vars(args), "clt": 1, "d_sae": args.d_sae // args.clt, "json": None}))
    per_layer_ms = args.clt * single["ms_per_step"]
    result = clt | {"per_layer_transcoder_ms": single["ms_per_step"], "per_layer_set_ms": per_layer_ms,
                    "clt_over_per_layer": clt["ms_per_step"] / per_layer_ms,
                    # the CLT's useful FLOPs over the set's: a dense variant's CLT has L(L+1)/2 decoder blocks to the
                    # set's L, so its time ratio cannot fall below about this
                    "clt_flops_over_per_layer": clt["flops"] / (args.clt * single["flops"]),
                    "per_layer_roofline_fraction": single["roofline_fraction"]}
    print(f"clt {args.variant} {args.clt} layers x {args.d_in} -> {args.d_sae} latents, batch {args.batch}: "
          f"{clt['ms_per_step']:.0f} ms/step, {args.clt} per-layer transcoders {per_layer_ms:.0f} ms "
          f"({result['clt_over_per_layer']:.2f}x; useful FLOPs {result['clt_flops_over_per_layer']:.2f}x); "
          f"CLT roofline fraction {clt['roofline_fraction']:.2f}, per-layer {single['roofline_fraction']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    layers = args.clt  # a transcoder over this many layers (1: one per-layer transcoder), 0: an SAE
    if layers:
        acts = torch.randn(max(4 * args.batch, 16384), 2 * layers * args.d_in, device=device) / args.d_in**0.5
        reads, writes = [f"in_{i}" for i in range(layers)], [f"out_{i}" for i in range(layers)]
        sites = Sites.of(reads, writes) if layers > 1 else Sites.of(reads[0], writes[0])
        with torch.device(device):
            sae = build(args.variant, args.d_in, args.d_sae, args.overrides + [f"d_out={args.d_in}"]
                        + ([f"sites={layers}"] if layers > 1 else []))
        d_in = args.d_in * layers
        site_acts = [part.contiguous() for part in acts.chunk(2 * layers, dim=1)]
        hooks = list(sites.reads) + list(sites.writes)
    elif args.acts:
        acts = torch.load(args.acts, weights_only=True).float()
        d_in = acts.shape[1]
    else:  # synthetic, roughly the scale of normalised activations (E||x||^2 = 1 at each site)
        d_in = args.d_in * args.sites
        acts = torch.randn(max(4 * args.batch, 16384), d_in) / args.d_in**0.5
    if not layers:
        acts = acts.to(device)  # the data is on the device before anything is timed
        sites = Sites.of([f"site_{s}" for s in range(args.sites)]) if args.sites > 1 else None
        with torch.device(device):
            sae = build(args.variant, d_in // args.sites, args.d_sae,
                        args.overrides + ([f"sites={args.sites}"] if sites else []))
        site_acts = [part.contiguous() for part in acts.chunk(args.sites, dim=1)] if sites else None
        hooks = list(sites.reads) if sites else []
    optim_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optim" / "adam.yaml")) | {"lr": 1e-4}
    member = SAEMember(sae, optim_cfg, max_steps=args.steps, dead_window_tokens=10_000_000,  # none dead: AuxK 0
                       precision=MEMBER_PRECISION[args.precision], sites=sites)
    module = SAEModule([member]).to(device)
    optimizer = module.configure_optimizers()["optimizer"]  # the optimiser training uses (fused Adam)
    module.on_fit_start()  # what the Trainer calls first: the allocator setting training runs with
    coefficients = {name: value for name, (value, _) in sae.scheduled_coefficients.items()}
    with_reference = (args.reference or device.type == "cuda") and not args.lean
    reference, reference_note = None, unsupported(args.variant, sae.cfg) if with_reference else "not asked for"
    if reference_note is None:  # built now: it starts from the weights saelab starts from
        reference = ReferenceSAE(args.variant, sae, float(optim_cfg["lr"]), member.param_group()["betas"],
                                 member.autocast_dtype)

    def batch(step: int) -> Tensor:
        start_row = (step * args.batch) % (len(acts) - args.batch + 1)
        return acts[start_row : start_row + args.batch]

    def site_batch(step: int) -> Tensor | dict[str, Tensor]:
        """What the module is handed: a tensor, or a crosscoder's {site: tensor}, which the step puts side by side."""
        if sites is None:
            return batch(step)
        start_row = (step * args.batch) % (len(acts) - args.batch + 1)
        return {name: part[start_row : start_row + args.batch] for name, part in zip(hooks, site_acts, strict=True)}

    clock = Clock(device)

    def saelab_step(x: Tensor, with_l0: bool) -> tuple[Any, Any, Any, Any]:
        """One step as SAEModule.training_step and the Trainer run it; clock marks at its phase boundaries."""
        start = clock.mark()
        x, target = member.input_and_target(x)  # sites side by side (SAEModule.training_step's work)
        with member.autocast(device.type):
            loss, _ = member.step_loss(x, coefficients, with_l0=with_l0, target=target)
        optimizer.zero_grad(set_to_none=True)
        forward_end = clock.mark()
        loss.backward()
        backward_end = clock.mark()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        sae.after_optimizer_step()
        return start, forward_end, backward_end, clock.mark()

    # This VM's speed drifts (by 10-30% within a minute at times), so every measured step is paired with a
    # roofline pass timed just before it, and the fraction is the median of the per-pair fractions.
    dtype = matmul_dtype(args.precision)
    roof_in, roof_sae = (args.d_in, args.d_sae // layers) if layers else (d_in, args.d_sae)  # per-layer shapes
    roofline = None if args.lean else Roofline(DENSE_PASSES[args.variant], args.batch, roof_in, roof_sae, dtype=dtype,
                                               device=device)
    flops = clt_flops(args.variant, sae, args.batch, layers) if layers > 1 else step_flops(args.variant, sae,
                                                                                            args.batch)
    marks, roofline_marks = [], []
    for step in range(args.warmup + args.steps):
        x = site_batch(step)
        roofline_pass = roofline.run() if roofline is not None else None
        step_marks = saelab_step(x, with_l0=(step + 1) % LOG_EVERY_N_STEPS == 0)
        if step >= args.warmup:
            marks.append(step_marks)
            roofline_marks.append(roofline_pass)
    clock.sync()
    roofline_flops = roofline.flops if roofline is not None else None
    del roofline  # its buffers: GiBs at the GPU shapes
    times = [clock.seconds(m[0], m[3]) for m in marks]
    roofline_times = [clock.seconds(*m) for m in roofline_marks if m is not None]
    phases = {name: [clock.seconds(m[i], m[i + 1]) for m in marks]
              for i, name in enumerate(("forward", "backward", "optimizer"))}

    step_s = statistics.median(times)
    gflops = flops / step_s / 1e9
    fractions = [(flops / t) / (roofline_flops / r) for t, r in zip(times, roofline_times, strict=True)] if (
        roofline_flops) else []
    roofline_gflops = roofline_flops / statistics.median(roofline_times) / 1e9 if roofline_flops else None
    with member.autocast(device.type):
        kernels = kernels_backend(batch(0))
    result = {
        "variant": args.variant, "d_in": d_in, "sites": args.sites, "d_sae": args.d_sae, "batch": args.batch,
        "threads": torch.get_num_threads(), "native_kernels": native.library() is not None,  # TopK's C++ kernels
        "ms_per_step": 1e3 * step_s, "tokens_per_s": args.batch / step_s,
        "flops": flops, "gflops": gflops, "roofline_gflops": roofline_gflops,
        "roofline_fraction": statistics.median(fractions) if fractions else None,
        "roofline_fraction_range": [min(fractions), max(fractions)] if fractions else None,  # over the pairs
        # Medians of the step's phases: the loss (forward, with bookkeeping), backward, and the optimiser phase
        # (decoder-gradient projection, Adam, renormalisation), which any implementation of the step pays.
        **{f"{phase}_ms": 1e3 * statistics.median(seconds) for phase, seconds in phases.items()},
        "device": device.type, "gpu": device_name(device), "torch": torch.__version__, "precision": args.precision,
        "matmul_dtype": str(dtype).removeprefix("torch."), "tflops": gflops / 1e3,
        "roofline_tflops": roofline_gflops / 1e3 if roofline_gflops else None, "kernels": kernels,
        "saelab_kernels": os.environ.get("SAELAB_KERNELS", "auto"), "steps": args.steps, "warmup": args.warmup,
    }
    if args.variant in SPARSE and not args.lean:
        candidates = getattr(sae, "screen_candidates_per_token", None)
        result["bf16_screen"] = candidates is not None
        result["screen_candidates_per_token"] = candidates
        bf16 = Roofline(DENSE_PASSES[args.variant], args.batch, d_in, args.d_sae, dtype=torch.bfloat16, device=device)
        result["bf16_roofline_gflops"] = bf16.gflops(max(5, args.steps // 2))  # the encoder shape
        del bf16
        # a CLT's dense step is its useful blocks' (clt_flops), at the rate of the per-layer shape
        dense = Roofline(DENSE_PASSES["relu"], args.batch, roof_in, roof_sae, dtype=dtype, device=device)
        dense_flops = clt_flops("relu", sae, args.batch, layers) if layers > 1 else dense.flops
        dense_step_s = dense_flops / (dense.gflops(max(5, args.steps // 2)) * 1e9)
        del dense
        result["dense_equivalent_fraction"] = dense_step_s / step_s
    if with_reference:
        result |= time_reference(reference, reference_note, batch, args.warmup, args.steps, args.sync_steps, clock)
        if result["reference_tokens_per_s"] is not None:
            result["reference_ratio"] = result["tokens_per_s"] / result["reference_tokens_per_s"]
        result |= count_host_syncs(lambda: saelab_step(batch(0), with_l0=False), args.sync_steps, device)
    if args.check_slice:
        result |= check_slice(args.variant, sae, batch(0), coefficients)
        sae.zero_grad(set_to_none=True)
    result["summary"] = summary(result)
    if device.type == "cpu" and fractions:
        print(cpu_line(result, len(fractions), fractions))
    if with_reference or args.lean or args.check_slice or device.type == "cuda":
        print(result["summary"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(result: dict[str, Any]) -> str:
    """The one line per run that benchmarks/gpu_check.sh collects (figures also in the JSON)."""
    line = (f"{result['variant']} {result['d_in']}x{result['d_sae']} b{result['batch']} {result['device']} "
            f"{result['precision']}: {tokens(result['tokens_per_s'])} tok/s")
    if result.get("roofline_tflops") is not None:
        line += f"  roofline {rate(result['roofline_tflops'])}  fraction {result['roofline_fraction']:.2f}"
    if result.get("reference_ratio") is not None:
        line += f"  reference {tokens(result['reference_tokens_per_s'])} tok/s ({result['reference_ratio']:.2f}x)"
    elif "reference_note" in result:
        line += f"  reference n/a ({result['reference_note']})"
    if result.get("syncs_per_step") is not None:
        line += f"  syncs/step {result['syncs_per_step']:.1f}"
    if "slice_ok" in result:
        line += f"  slice {'ok' if result['slice_ok'] else 'WRONG'} ({result['slice_errors']})"
    return line


def tokens(per_s: float) -> str:
    """1,234k above 10k tokens/s (GPU figures), plain below (tiny CPU smoke runs)."""
    return f"{per_s / 1e3:,.0f}k" if per_s >= 1e4 else f"{per_s:,.0f}"


def rate(tflops: float) -> str:
    """612 TFLOP/s on a GPU; GFLOP/s below 1 TFLOP/s."""
    return f"{tflops:,.0f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def cpu_line(result: dict[str, Any], pairs: int, fractions: list[float]) -> str:
    """The CPU benchmark's line, as it has always read."""
    d_in = (f"{result['sites']} sites x {result['d_in'] // result['sites']}" if result["sites"] > 1
            else str(result["d_in"]))
    return (f"{result['variant']:>9} d_in {d_in} d_sae {result['d_sae']} batch {result['batch']}: "
            f"{result['ms_per_step']:.1f} ms/step, {result['tokens_per_s']:,.0f} tok/s, {result['gflops']:.1f} GFLOP/s "
            f"of {result['roofline_gflops']:.1f} roofline; fraction {100 * result['roofline_fraction']:.0f}% (median "
            f"of {pairs} step/roofline pairs, range {100 * min(fractions):.0f}-{100 * max(fractions):.0f}%)"
            + (f"; {result['dense_equivalent_fraction']:.2f}x a dense step at the roofline"
               if "dense_equivalent_fraction" in result else "")
            + f"; phases (ms) forward {result['forward_ms']:.1f}, backward {result['backward_ms']:.1f}, "
              f"optimiser {result['optimizer_ms']:.1f}"
            + ("" if result["native_kernels"] or result["variant"] not in SPARSE else "; native kernels OFF")
            + (f"; bf16 screen ON ({result['screen_candidates_per_token']:.1f} exact values per token; bf16 matmul "
               f"{result['bf16_roofline_gflops']:.1f} GFLOP/s)" if result.get("bf16_screen") else ""))


if __name__ == "__main__":
    main()
