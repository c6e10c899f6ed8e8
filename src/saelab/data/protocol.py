"""What run/ needs of a datamodule, declared once: the StreamDataModule Protocol.

A source's `datamodule()` (data/sources/) returns one; run/stream.py sets it up and holds it in a Stream, and
training, evaluation and the export read it there. The two saelab builds, the text one (data/datamodule.py,
ActivationDataModule) and the generated one (data/synthetic_datamodule.py, WorldDataModule), both satisfy it,
and a new source's must too: tests/test_datamodule_protocol.py checks both, and that every `datamodule.<attr>`
run/ and cli/ read is a member here (bar saelab-cache's `cache`, which only the text one has), so a new use cannot
go undeclared.

It is a LightningDataModule as well (run/training.py hands it to `trainer.fit`); a Protocol cannot say so, so the
Lightning hooks saelab relies on are listed as members. Members a source without text cannot have are Optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import DataLoader

    from saelab.data.tokens import SpecialTokens


@runtime_checkable
class StreamDataModule(Protocol):
    """The datamodule a Stream holds. Every member below is read by run/ (or Lightning on its behalf)."""

    scales: dict[str, float]
    """The normalisation scale C per hook, set by setup(): training reads x / C, the export folds C back in."""

    input_rms: dict[str, float]
    """sqrt(E||x||^2) of the normalised activations per hook (1 under the default normalisation): fields given in
    units of E||x||^2 = 1 are adapted to it (sae.adapt_to_input_scale, run/training.py)."""

    eval_acts: dict[str, Tensor]
    """The held-out activations per hook, normalised ([eval_tokens, d]): the held-out metrics (run/evaluation.py)."""

    eval_firing: Tensor | None
    """[eval_tokens, n_features] bool: which true features fire in each held-out sample, for a source that knows
    its world (the ground-truth metrics read it only then); None otherwise."""

    eval_windows: Tensor | None
    """The held-out token windows [n, context_size], in corpus order, for the spliced metrics; None without text."""

    special: SpecialTokens | None
    """The model's special-token ids, which the spliced metrics leave out of their positions; None without a
    tokenizer."""

    def setup(self, stage: str | None = None) -> None:
        """Estimate the scales and collect the held-out set (run/stream.open_stream calls it once, before any
        member above is read; Lightning calls it again, so a second call does nothing)."""

    def train_dataloader(self) -> DataLoader:
        """Training batches {hook: normalised [batch, d]}, from the resumed data position (trainer.fit reads it)."""

    def state_dict(self) -> dict[str, Any]:
        """The data position (`batches_consumed`) and scales, saved in checkpoints so a resumed run continues the
        stream where it stopped."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's data position (Lightning calls it when a run resumes)."""
