"""Which latents are dead: per-latent counters of the tokens since each last fired, and host-side bounds on them.

The counters live on the device and are saved in checkpoints; a logging step reads them (refresh_dead_bound), so
that between reads the host can bound them without waiting for the device: none_dead proves no latent is dead and
dead_bound caps how many may be (TopK's AuxK sizes its fixed-shape selection by it).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DeadRead:
    """tokens_since_fired as a logging step read it (refresh_dead_bound): its maximum and, for one dead window,
    the distinct values of min(counter, window), ascending, each with how many latents are at least that."""

    max_since_fired: int
    window: int | None = None
    values: tuple[int, ...] = ()
    at_least: tuple[int, ...] = ()

    def possibly_dead(self, tokens_since: int) -> int:
        """Latents that may have reached the window `tokens_since` tokens after the read: a counter grows by at most
        the tokens since (or resets), so only those that were at window - tokens_since or more."""
        i = bisect.bisect_left(self.values, self.window - tokens_since)
        return self.at_least[i] if i < len(self.values) else 0


class DeadLatentCounters(nn.Module):
    """The SAE's dead-latent bookkeeping (a base of saes/base.SAE; its counters are SAE buffers, as checkpoints
    name them). init_dead_latent_counters runs in SAE.__init__, once d_sae is known."""

    d_sae: int
    tokens_since_fired: Tensor
    tokens_seen: Tensor

    def init_dead_latent_counters(self) -> None:
        # Tokens seen since each latent last fired: dead-latent bookkeeping, saved in checkpoints.
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        # Host-side bounds on them (none_dead, dead_bound): unknown until a logging step reads the counters
        # (refresh_dead_bound), so counters written in place before then (a broadcast, a test) are never missed.
        self._dead_read: DeadRead | None = None
        self._tokens_since_read = 0
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def record_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Dead-latent bookkeeping from a [d_sae] mask of the latents that fired in the last `n_tokens` tokens."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.tokens_seen.add_(n_tokens)
        self._tokens_since_read += n_tokens

    def dead_count_window(self) -> int | None:
        """The dead window whose count of dead latents a step wants bounded on the host (dead_bound: TopK's AuxK
        sizes its selection by it); None: only the counters' maximum is read."""
        return None

    def refresh_dead_bound(self) -> None:
        """Read the counters' maximum and, for dead_count_window, how many latents are how close to it (a host
        synchronisation: logging steps call this)."""
        counters, window = self.tokens_since_fired, self.dead_count_window()
        if not self.d_sae:
            read = DeadRead(0)
        elif window is None:
            read = DeadRead(int(counters.max()))
        else:  # at most window / batch + 2 distinct values while every batch has the same size
            values, counts = counters.clamp(max=window).unique(sorted=True, return_counts=True)
            host = torch.cat([counters.max().view(1), values, counts]).tolist()
            n = values.numel()
            at_least = list(itertools.accumulate(reversed(host[1 + n:])))[::-1]
            read = DeadRead(host[0], int(window), tuple(host[1:1 + n]), tuple(at_least))
        self._dead_read, self._tokens_since_read = read, 0

    @torch.compiler.disable  # host arithmetic: compiled, each step's new token count would force a recompilation
    def none_dead(self, window_tokens: int) -> bool:
        """True when no latent can be dead (dead_mask all false), proven on the host without reading the device:
        the counters only grow by each batch's tokens (or reset), so their maximum is at most the last read one
        plus the tokens since. False when unproven (the bound is unknown until refresh_dead_bound, and a loaded
        state forgets it); a GPU step then computes what depends on the dead latents in fixed shapes."""
        read = self._dead_read
        return read is not None and read.max_since_fired + self._tokens_since_read < int(window_tokens)

    @torch.compiler.disable  # as none_dead
    def dead_bound(self, window_tokens: int) -> int | None:
        """An upper bound on the number of dead latents (dead_mask(window_tokens).sum()) known on the host, as
        none_dead's: from the last read (for dead_count_window's window) and the tokens since; None if unknown."""
        read = self._dead_read
        if self.none_dead(window_tokens):
            return 0
        if read is None or read.window != int(window_tokens):
            return None
        return read.possibly_dead(self._tokens_since_read)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dead_read = None  # new counters: the bounds are unknown until read again
        super()._load_from_state_dict(*args, **kwargs)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Latents that have not fired in the last `window_tokens` tokens. Before a window has passed nothing is
        dead: a latent that missed the first batches is not dead, and one that fired early and then stopped is
        dead once a whole window has passed without it (as SAELens's and sparsify's counters)."""
        return self.tokens_since_fired >= int(window_tokens)
