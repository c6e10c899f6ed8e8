"""Read-ahead for a slow iterator: its next items are produced in a background thread while the consumer works.

Made for the uncached activation stream (saelab.data.datamodule): the model's next forward pass runs while the
SAEs take their step on the current batch. torch and numpy release the GIL inside their kernels, so a forward in
the thread overlaps the step (fully when the model has its own device, `model.device=cuda:1`; partly on a CPU,
where both share the cores). Nothing here knows about models: any iterator can be read ahead.

The order is the source's, exactly; at most `depth` items are produced and not yet taken by the consumer (a
semaphore, not only a bounded queue, so the item in the producer's hands counts too); an exception raised by the
source is raised in the consumer, at the position it happened; `close()` (or the consumer's garbage collection,
or reaching the end) stops the thread, which lets go of the source and closes it.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

THREAD_PREFIX = "saelab-prefetch"  # the producer threads' names start with it (tests look for leaked ones)
_END = object()  # the source is exhausted
_ids = itertools.count()


class _Failure:
    """The source raised: carried through the queue so the consumer raises it where the item would have been."""

    def __init__(self, error: BaseException):
        self.error = error


def _produce(source: Iterator[T], items: queue.SimpleQueue, slots: threading.Semaphore,
             stop: threading.Event) -> None:
    """The producer thread's loop. It holds no reference to the Prefetch object, so dropping that object stops
    the thread (Prefetch.__del__)."""
    try:
        while True:
            slots.acquire()  # a slot per item produced and not yet taken: the read-ahead bound
            if stop.is_set():
                return
            try:
                item = next(source)
            except StopIteration:
                items.put(_END)
                return
            except BaseException as error:  # noqa: BLE001 -- every failure goes to the consumer
                items.put(_Failure(error))
                return
            items.put(item)
    finally:
        close = getattr(source, "close", None)
        if close is not None:  # a generator source runs its own `finally` blocks here, in its thread
            close()


class Prefetch(Generic[T]):
    """An iterator over `source`'s items, the next up to `depth` of them produced ahead in a daemon thread.

    The thread starts on the first `next()` (building one costs nothing until it is read). Use `close()` (or a
    `with` block) when stopping early; otherwise the thread stops when this object is garbage-collected.
    """

    def __init__(self, source: Iterable[T], depth: int):
        if depth < 1:
            raise ValueError(f"a read-ahead depth of at least 1, not {depth} (0: iterate the source itself)")
        self.depth = depth
        self._source: Iterator[T] | None = iter(source)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._items.get()
        if item is _END:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            raise item.error
        self._slots.release()  # taken: the producer may make one more
        return item

    def _start(self) -> None:
        source, self._source = self._source, None  # the thread alone holds it from now on
        self._thread = threading.Thread(target=_produce, args=(source, self._items, self._slots, self._stop),
                                        name=f"{THREAD_PREFIX}-{next(_ids)}", daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        self._done = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self, timeout: float | None = None) -> None:
        """Stop producing and wait (up to `timeout` seconds; None: as long as it takes) for the item in progress,
        which is dropped, as are the items read ahead. Idempotent."""
        if self._done:
            return
        self._done = True
        self._stop.set()
        self._slots.release()  # wake a producer waiting for a slot: it sees the stop and returns
        if self._thread is None:  # never started: the source is closed here, as the thread would have
            source, self._source = self._source, None
            close = getattr(source, "close", None)
            if close is not None:
                close()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._items = queue.SimpleQueue()  # drop the items read ahead

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Garbage collection may run in any thread, at any moment: signal the producer, never wait for it.
        if not getattr(self, "_done", True):
            self._done = True
            self._stop.set()
            self._slots.release()

