"""The progress bar: the group's loss and tokens/s as Python numbers read on logging steps.

Lightning's own route (`self.log(..., prog_bar=True)`) keeps the logged device tensor and converts it with
`.item()` at every batch end, logging step or not: a host synchronisation per step on a GPU. Here the module
reads the two values once per logging step (when it reads the loss anyway) and the bar shows those floats.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing `pl_module.progress` (floats) beside its standard entries."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress", {})}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The bar's total is the run's steps. A fresh run's comes from on_train_epoch_start, which a run resumed
        mid-epoch (every resumed run: the stream is one epoch) never gets, so its bar read `405/?`; set here, it
        reads `405/3200`, counting on from the checkpoint's step."""
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches  # max_steps: the stream has no length and no epochs
        self.train_progress_bar.total = None if math.isinf(total) else int(total)


def replacing_default_bar(trainer: L.Trainer | None) -> list[L.Callback]:
    """[ProgressBar()] where the trainer shows Lightning's default bar (LightningModule.configure_callbacks then
    swaps it in); nothing where the bar is off or another kind was chosen."""
    bar = trainer.progress_bar_callback if trainer is not None else None
    return [ProgressBar(bar.refresh_rate)] if type(bar) is TQDMProgressBar else []
