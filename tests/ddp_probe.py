"""A callback the DDP test adds through the CLI: each rank records what it trained on and its final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class RankRecorder(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches: list[str] = []
        self.rows: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        (data,) = batch.values()  # {hook: activations}: one hook here
        data = data.detach().cpu().contiguous()
        self.batches.append(hashlib.sha1(data.numpy().tobytes()).hexdigest())
        self.rows.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in data)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.sae.state_dict().items()}
        save_file(state, str(self.out_dir / f"rank{rank}.safetensors"))
        record = {"world_size": trainer.world_size, "batches": self.batches, "rows": self.rows}
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
