"""The SAELens side of the cross-check (run in the throwaway sae-lens venv; imports nothing from saelab).

Trains every SAE of a plan with SAELens's own training code -- its TrainingSAE classes and `MultiSAETrainer`,
which drives one `SAETrainer` per SAE through `SAETrainer.step` in lockstep over one stream -- with SAELens's
defaults for everything the plan does not set (the settings of `sae_lens.synthetic.train_toy_sae`, its recipe
for synthetic data: constant lr, no warm-up or decay, Adam betas (0.9, 0.999), gradient-norm clipping at 1,
dead_feature_window 1000 steps; each SAE class's defaults: decoder init norm 0.1, TopK-family decoder norm
folded into the activations, AuxK coefficient 1, ...). The samples are read from a file of raw float32 written
by feed.py (saelab's normalised stream, in order), so SAELens sees exactly what saelab trains on; the SAEs'
normalize_activations is "none" for that reason.

    python train_saelens.py PLAN.json STREAM.f32 HELDOUT.pt OUT_DIR --lr 3e-3

Each SAE is saved with `save_inference_model` to OUT_DIR/<name> (inputs in saelab's normalised units), and
OUT_DIR/saelens_l0.json gets each SAE's held-out L0 (SAELens's own inference forward), used to calibrate the
sparsity coefficients of L1, Gated and JumpReLU to a target L0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE, __version__
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

CLASSES = {  # saelab's variant name -> SAELens's training SAE and config, and the field the plan's value sets
    "relu": (StandardTrainingSAE, StandardTrainingSAEConfig, "l1_coefficient"),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, "l1_coefficient"),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, "l0_coefficient"),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, "k"),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, "k"),
    "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, "k"),
}


def build(entry: dict, d_in: int) -> object:
    cls, cfg_cls, field = CLASSES[entry["arch"]]
    kwargs = {"d_in": d_in, "d_sae": int(entry["d_sae"]), "normalize_activations": "none",
              field: entry["value"], **entry.get("extra", {})}
    if entry["arch"] in ("topk",):
        kwargs[field] = int(round(entry["value"]))
    torch.manual_seed(int(entry["seed"]))
    return cls(cfg_cls(**kwargs))


def batches(path: str, batch: int, d_in: int, steps: int):
    data = np.memmap(path, dtype=np.float32, mode="r")
    need = steps * batch * d_in
    if data.size < need:
        raise SystemExit(f"{path}: {data.size} floats, {need} needed")
    for i in range(steps):
        chunk = np.array(data[i * batch * d_in:(i + 1) * batch * d_in]).reshape(batch, d_in)
        yield {"x": torch.from_numpy(chunk)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("stream")
    ap.add_argument("heldout")
    ap.add_argument("out")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=None, help="fewer steps than the budget (tests)")
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    held = torch.load(args.heldout)
    d_in, batch, steps = held["d_in"], held["batch_size"], args.steps or held["steps"]
    torch.set_num_threads(1)
    saes = {e["name"]: build(e, d_in) for e in plan}
    cfg = SAETrainerConfig(  # sae_lens.synthetic.train_toy_sae's settings, lr and budget from the plan
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=args.lr, lr_end=args.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, n_restart_cycles=1,
        adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False, dead_feature_window=1000,
        feature_sampling_window=2000, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    started = time.time()
    trainer = MultiSAETrainer(cfg, saes, {name: "x" for name in saes}, batches(args.stream, batch, d_in, steps))
    trainer.fit()
    elapsed = time.time() - started
    out = Path(args.out)
    l0s = {}
    x = held["x"]
    for name, sae in saes.items():
        sae.save_inference_model(out / name)
        loaded = SAE.load_from_disk(str(out / name))
        with torch.no_grad():
            l0s[name] = float((loaded.encode(x) > 0).float().sum(-1).mean())
    previous = json.loads((out / "saelens_l0.json").read_text()) if (out / "saelens_l0.json").exists() else {}
    (out / "saelens_l0.json").write_text(json.dumps(previous | l0s, indent=1))
    print(f"SAELens {__version__}: trained {len(saes)} SAEs x {steps} steps of {batch} in {elapsed:.0f} s; "
          "held-out L0 " + ", ".join(f"{k} {v:.2f}" for k, v in l0s.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
