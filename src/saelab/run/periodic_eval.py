"""Lightning callbacks: held-out evaluation every N steps."""

from __future__ import annotations

import lightning as L

from saelab.metrics.evaluate import evaluate_sae


class PeriodicEval(L.Callback):
    """Evaluate every member on its hook's held-out activations every `every_n_steps` (a transcoder against its
    target hook's, as the end-of-run evaluation does); each job's loggers get its own metrics as `eval/<name>`."""

    def __init__(self, every_n_steps: int, batch_size: int):
        self.every_n_steps, self.batch_size = int(every_n_steps), int(batch_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step < (trainer.max_steps or step + 1):
            eval_acts = trainer.datamodule.eval_acts
            for member in pl_module.members:
                if member.alive:
                    acts = eval_acts[member.hook] if isinstance(eval_acts, dict) else eval_acts
                    targets = eval_acts[member.target_hook] if member.target_hook is not None else None
                    metrics, _ = evaluate_sae(member.sae, acts, self.batch_size, targets=targets)
                    member.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, pl_module._log_step())
