"""A shuffle buffer of bounded size: its memory is set by capacity, never by the token budget."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


class ShuffleBuffer:
    """Fill to capacity, shuffle, emit half as batches, keep the other half to mix with new activations.

    Activations from one context are therefore spread over many batches, and each batch mixes contexts
    from several refills. Memory: capacity x d floats plus one incoming chunk.
    """

    def __init__(self, chunks: Iterable[Tensor], capacity: int, batch_size: int, generator: torch.Generator):
        if capacity < 2 * batch_size:
            raise ValueError(f"data.buffer_tokens={capacity} is too small: expected at least 2 x data.batch_size")
        self.chunks, self.capacity, self.batch_size, self.generator = chunks, capacity, batch_size, generator

    def __iter__(self) -> Iterator[Tensor]:
        source = iter(self.chunks)
        buffer: Tensor | None = None
        filled = 0
        pending = torch.empty(0)
        exhausted = False
        while True:
            while filled < self.capacity and not exhausted:
                if len(pending) == 0:
                    try:
                        pending = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                if buffer is None:
                    buffer = torch.empty(self.capacity, pending.shape[1], dtype=pending.dtype)
                take = min(len(pending), self.capacity - filled)
                buffer[filled : filled + take] = pending[:take]
                pending, filled = pending[take:], filled + take
            if buffer is None or filled < self.batch_size:
                return
            buffer[:filled] = buffer[:filled][torch.randperm(filled, generator=self.generator)]
            n_out = (filled // 2 if not exhausted else filled) // self.batch_size * self.batch_size
            n_out = max(n_out, self.batch_size)
            for start in range(0, n_out, self.batch_size):
                yield buffer[start : start + self.batch_size].clone()
            buffer[: filled - n_out] = buffer[n_out:filled].clone()
            filled -= n_out
