"""The sites an SAE reads and writes: the one contract for SAEs, transcoders and crosscoders.

A site is a hook of the model (or a generated world's named activation). Batches reach a job as {site: tensor};
its SAE reads the concatenation of its `reads` and is trained to output the concatenation of its `writes`:

- an SAE reads and writes one site;
- a transcoder reads one site and writes another (model.target_hook);
- a crosscoder (Lindsey et al. 2024) reads and writes the same several sites (model.hook given as a list). Its
  encoder then sums each site's projection (x W_enc over the concatenation) and its decoder has one block of
  columns per site, so every variant's activation function serves it unchanged;
- a cross-layer transcoder (Ameisen et al. 2025) reads several layers' MLP inputs and writes their MLP outputs
  (model.hook and model.target_hook given as lists of one length, in forward order): the latents of layer l read
  reads[l] alone and write writes[l] and every later write (saes/cross_layer.py keeps its weights to that shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.errors import ConfigError


@dataclass(frozen=True)
class Sites:
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @classmethod
    def of(cls, hook: str | Sequence[str], target_hook: str | Sequence[str] | None = None) -> Sites:
        """From model.hook (one hook, or a list: a crosscoder) and model.target_hook (a transcoder's target; a list
        as long as model.hook's: a cross-layer transcoder)."""
        reads = _names(hook)
        return cls(reads, reads if target_hook is None else _names(target_hook))

    @property
    def hook(self) -> str:
        """The first site read: the hook of an SAE or a transcoder."""
        return self.reads[0]

    @property
    def target_hook(self) -> str | None:
        """A transcoder's target (the first site it writes, which it does not read); None when it writes what it
        reads."""
        return None if self.writes == self.reads else self.writes[0]

    @property
    def several(self) -> bool:
        """Whether the SAE reads several sites (a crosscoder or a cross-layer transcoder): each has its own scale."""
        return len(self.reads) > 1

    @property
    def cross_layer(self) -> bool:
        """A cross-layer transcoder: several reads, each paired with a write of its layer."""
        return self.several and self.writes != self.reads

    @property
    def scaled(self) -> tuple[str, ...]:
        """The sites whose normalisation scales an export folds in, in order: the reads, then a cross-layer
        transcoder's writes."""
        return self.reads + (self.writes if self.cross_layer else ())

    @property
    def hooks(self) -> list[str]:
        """Every site, each once: what the stream must serve."""
        return list(dict.fromkeys(self.reads + self.writes))

    @property
    def crosscoder(self) -> bool:
        """Several sites, read and written alike."""
        return self.several and self.writes == self.reads

    def input(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The SAE's input: the read sites' activations side by side ([B, n_reads * d])."""
        return _side_by_side(batch, self.reads)

    def target(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """A transcoder's target; None where the SAE reconstructs its input."""
        return None if self.writes == self.reads else _side_by_side(batch, self.writes)

    def check(self, field: str = "model.hook") -> None:
        """A site listed twice would be counted twice in the loss: refused. Several targets pair with the reads
        one to one (a cross-layer transcoder), and none of them is read."""
        if len(set(self.reads)) != len(self.reads):
            raise ConfigError(field, list(self.reads), "a list of distinct hooks")
        if self.writes == self.reads:
            return
        if len(self.writes) > 1 or self.several:
            if len(self.writes) != len(self.reads):
                raise ConfigError("model.target_hook", list(self.writes), f"a list as long as model.hook's "
                                  f"({len(self.reads)}: one MLP output for each MLP input, a cross-layer transcoder)")
            if len(set(self.writes)) != len(self.writes) or set(self.writes) & set(self.reads):
                raise ConfigError("model.target_hook", list(self.writes), "distinct hooks, none of them in "
                                  "model.hook")


def _names(hooks: str | Sequence[str]) -> tuple[str, ...]:
    return (str(hooks),) if isinstance(hooks, str) else tuple(str(h) for h in hooks)


def _side_by_side(batch: Mapping[str, Tensor], names: tuple[str, ...]) -> Tensor:
    return batch[names[0]] if len(names) == 1 else torch.cat([batch[n] for n in names], dim=-1)


def column_scales(scales: Sequence[float], width: int) -> Tensor:
    """Each column's normalisation scale for sites side by side, each `width` wide ([len(scales) * width])."""
    return torch.tensor([float(c) for c in scales], dtype=torch.float32).repeat_interleave(width)
