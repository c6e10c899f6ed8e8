"""Lightning callbacks: held-out evaluation every N steps."""

from __future__ import annotations

import lightning as L

from saelab.metrics.evaluate import evaluate_sae


class PeriodicEval(L.Callback):
    """Evaluate on the datamodule's held-out activations every `every_n_steps`; log them as `eval/<name>`."""

    def __init__(self, every_n_steps: int, batch_size: int):
        self.every_n_steps, self.batch_size = int(every_n_steps), int(batch_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step < (trainer.max_steps or step + 1):
            metrics, _ = evaluate_sae(pl_module.sae, trainer.datamodule.eval_acts, self.batch_size)
            pl_module.log_dict({f"eval/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
