"""Held-out evaluation every N steps (eval.every_n_steps): the end-of-run evaluation (run/evaluation.py) on the
same stream, logged as eval/<name> to each job's own loggers."""

from __future__ import annotations

import lightning as L

from saelab.run.evaluation import held_out_metrics
from saelab.run.stream import Stream


class PeriodicEval(L.Callback):
    """Evaluate every live member on its hook's held-out activations every `every_n_steps` (a transcoder against its
    target hook's, ground truth where the source knows it), exactly as the end of the run does."""

    def __init__(self, every_n_steps: int, batch_size: int, stream: Stream | None = None):
        self.every_n_steps, self.batch_size = int(every_n_steps), int(batch_size)
        self.stream = stream  # set once the run's stream is open; None: the trainer's datamodule, no ground truth

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step < (trainer.max_steps or step + 1):
            stream = self.stream or Stream(None, None, trainer.datamodule)
            for member in pl_module.members:
                if member.alive:
                    metrics, _ = held_out_metrics(member.sae, stream, member.sites, self.batch_size)
                    member.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, pl_module._log_step())
