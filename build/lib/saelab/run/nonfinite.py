"""Non-finite loss terms noted on the device and read on logging steps: a GPU step then never waits for the host.

On the CPU a step reads `isfinite(loss)` at once (it costs nothing there). On a GPU that read stalls the host
until the queue drains, every step, so there the step records which terms were non-finite, and at which step
first, in device tensors; the optimiser skips the update on the device (fused Adam's `found_inf`, the mechanism
GradScaler uses), and the next logging step reads the record once and reports the step and the terms as the
immediate check would. Nothing non-finite is applied to the weights in between, so nothing non-finite can be
checkpointed (SAEModule.on_save_checkpoint checks the weights as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Report:
    """What the watch saw since its last read: the first bad step, the terms ever non-finite, how many steps."""

    first_step: int
    terms: list[str]
    steps: int

    def message(self) -> str:
        return f"non-finite loss at step {self.first_step}: term(s) {', '.join(self.terms)}"


class NonFiniteWatch:
    """Per member: device-side flags of non-finite loss terms, read (one synchronisation) by `read`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.bad_terms: Tensor | None = None  # [n_terms] bool: non-finite at some recorded step
        self.first_step: Tensor | None = None  # long scalar: the first bad step, -1 if none
        self.bad_steps: Tensor | None = None  # long scalar: how many recorded steps were bad
        self.last_bad: Tensor | None = None  # bool scalar: the latest recorded step was bad

    def record(self, terms: dict[str, Tensor], step: int) -> Tensor:
        """Note this step's terms; returns a bool device scalar, true if any term is non-finite."""
        names = list(terms)
        flags = torch.stack([~torch.isfinite(term.detach()).all() for term in terms.values()])
        if self.bad_terms is None or names != self.names:
            self.names, self.bad_terms = names, torch.zeros_like(flags)
            self.first_step = torch.full((), -1, dtype=torch.long, device=flags.device)
            self.bad_steps = torch.zeros((), dtype=torch.long, device=flags.device)
        bad = flags.any()
        self.bad_terms |= flags
        self.first_step = torch.where(bad & (self.first_step < 0), step, self.first_step)
        self.bad_steps += bad
        self.last_bad = bad
        return bad

    def read(self) -> Report | None:
        """The report since the last read (None if every recorded step was finite); clears the record."""
        if self.bad_terms is None:
            return None
        first = int(self.first_step)  # the one host synchronisation, on a logging step
        if first < 0:
            return None
        report = Report(first, [n for n, b in zip(self.names, self.bad_terms.tolist(), strict=True) if b],
                        int(self.bad_steps))
        self.bad_terms = None
        return report
