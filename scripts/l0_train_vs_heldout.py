"""Each finished job's L0 on the activations it trained on, beside its held-out L0 and that figure's sampling error.

    python scripts/l0_train_vs_heldout.py MULTIRUN_DIR [overrides...]

`sae.target_l0`'s controller sees training batches; the reports give the held-out L0. Where the two differ the
cause is the data (the held-out documents fire more or fewer latents), not the controller. For each job this
encodes, with its exported SAE (MULTIRUN_DIR/<job>/sae), the first data.train_tokens activations of the training
stream in the order the run read them (the stream of its data.seed) and the held-out set, and prints:
the target; L0 on the training stream (mean over its batches); held-out L0; the held-out L0's standard error from
contiguous blocks of 1,024 activations (8 windows of 128 tokens: tokens of one window are not independent, so a
per-token error would be far too small). The overrides are the run's own (e.g. paths.cache_dir=...), so the same
stream opens; data.seed and data.train_tokens come from each job's config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

BLOCK = 1024


def training_activations(stream, hook: str, tokens: int) -> torch.Tensor:
    taken, seen = [], 0
    for batch in stream.datamodule.train_dataloader():
        x = batch[hook] if isinstance(batch, dict) else batch
        taken.append(x)
        seen += x.shape[0]
        if seen >= tokens:
            break
    return torch.cat(taken)[:tokens]


def main(argv: list[str]) -> int:
    from saelab.run.stream import open_stream_of
    from saelab.saes.saelens_format import load_exported

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    sweep, overrides = Path(argv[0]), argv[1:]
    jobs = sorted((p.parent.parent for p in sweep.glob("*/sae/cfg.json")), key=lambda p: int(p.name))
    streams = {}
    print("| job | series | target | L0 on the training stream | held-out L0 | its s.e. | held-out - target |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        seed, tokens = config["data"]["seed"], int(config["data"]["train_tokens"])
        key = (seed, tokens)
        if key not in streams:
            _, stream, hook = open_stream_of([*overrides, f"data.seed={seed}", f"data.train_tokens={tokens}"])
            scale = float(stream.datamodule.scales[hook])
            streams[key] = (training_activations(stream, hook, tokens) * scale,
                            stream.datamodule.eval_acts[hook] * scale)
        train, held_out = streams[key]
        exported = load_exported(job / "sae")
        with torch.no_grad():
            train_l0 = torch.cat([(exported.encode(c) > 0).sum(-1).float() for c in train.split(8192)]).mean()
            per_token = torch.cat([(exported.encode(c) > 0).sum(-1).float() for c in held_out.split(8192)])
        blocks = per_token[: len(per_token) // BLOCK * BLOCK].view(-1, BLOCK).mean(1)
        error = blocks.std() / len(blocks) ** 0.5
        target = config["sae"].get("target_l0")
        held = float(json.loads((job / "metrics.json").read_text())["l0"])
        if abs(float(per_token.mean()) - held) > 1e-3 * held:
            print(f"warning: job {job.name}: held-out L0 {float(per_token.mean()):.3f} from its export, {held:.3f} in "
                  "its metrics.json (another held-out set?)", file=sys.stderr)
        overrides_of_job = (job / ".hydra" / "overrides.yaml")
        series = ", ".join(o for o in yaml.safe_load(overrides_of_job.read_text())
                           if o.startswith("sae.") and not o.startswith("sae.target_l0"))
        gap = f"{100 * (held / target - 1):+.1f}%" if target else "-"
        print(f"| {job.name} | {series} | {target} | {float(train_l0):.2f} | {held:.2f} | {float(error):.2f} | {gap} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
