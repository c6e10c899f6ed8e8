"""The data position every datamodule saves in checkpoints, so a resumed run continues its stream where it stopped."""

from __future__ import annotations

from typing import Any

import lightning as L


class PositionedDataModule(L.LightningDataModule):
    """A LightningDataModule whose checkpointed state is the batches this rank trained on and its scales.

    Subclasses set `self.scales` and skip `self._resume_batches` batches when their stream starts (then zero it).
    """

    scales: dict[str, float]
    _resume_batches: int = 0  # batches this rank consumed before the checkpoint it resumes from

    def state_dict(self) -> dict[str, Any]:
        """Batches this rank has trained on, and the normalisation scales, at checkpoint time."""
        return {"batches_consumed": self._batches_consumed(), "scales": dict(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_batches = int(state["batches_consumed"])
        self.scales.update(state.get("scales", {}))

    def _batches_consumed(self) -> int:
        # Lightning's count of training batches whose step ran (a skipped non-finite batch counts too); it
        # includes the current batch when a checkpoint is written at its end. Prefetched batches do not count.
        if self.trainer is None:
            return self._resume_batches
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
