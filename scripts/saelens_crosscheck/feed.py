"""The data side of the SAELens cross-check (run in saelab's venv): open the stream `saelab-train` would open for
the given overrides (data=..., data.seed=..., data.batch_size=..., data.train_tokens=...) and either

  feed.py meta OUT [overrides]     write OUT/heldout.pt: the normalised held-out activations, the normalisation
                                   scale C, the world's sizes and the step count
  feed.py stream [overrides]       write the training batches, normalised (x / C) exactly as saelab trains on
                                   them and in the same order, to stdout as raw float32 ([batch, d_in] each)

so SAELens, in its own venv, trains on byte-identical samples without importing saelab. Any source whose
datamodule has train_batches(), eval_acts and scales (data=synthetic, and a world source built like it) works.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch


def open_stream(overrides: list[str]):
    from saelab.run.stream import open_stream_of

    return open_stream_of(overrides)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode, rest = argv[0], argv[1:]
    if mode == "meta":
        out, overrides = Path(rest[0]), rest[1:]
    elif mode == "stream":
        out, overrides = None, rest
    else:
        raise SystemExit("usage: feed.py meta OUT [overrides] | feed.py stream [overrides]")
    cfg, stream, hook = open_stream(overrides)
    dm = stream.datamodule
    from saelab.run.job import run_steps

    batch, steps = int(cfg.data.batch_size), run_steps(cfg)  # as saelab-train counts them
    if mode == "meta":
        truth = stream.truth
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"x": dm.eval_acts[hook].contiguous(), "scale": float(dm.scales[hook]),
                    "d_in": int(dm.eval_acts[hook].shape[1]), "batch_size": batch, "steps": steps,
                    "n_features": int(truth.dictionary.shape[0]) if truth is not None else None},
                   out / "heldout.pt")
        print(f"held-out {tuple(dm.eval_acts[hook].shape)}, scale C = {dm.scales[hook]:.6g}, {steps} steps of {batch}",
              file=sys.stderr)
        return 0
    sink = sys.stdout.buffer
    for i, b in enumerate(dm.train_batches()):
        if i == steps:
            break
        sink.write(b[hook].float().contiguous().numpy().tobytes())
    sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
