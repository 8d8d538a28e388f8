"""Device prefetch: a bounded queue of batches already placed on the mesh, ahead of the step that consumes them.

The pattern of ``flax.jax_utils.prefetch_to_device`` / big_vision's ``start_global(..., n_prefetch)``, for global
``NamedSharding`` arrays (``sharding.to_global_batch``): while the device runs step n, the host has already read
and placed the batches of steps n+1 .. n+size, so their host→device copies overlap the compute instead of
preceding the next dispatch. The queue is filled synchronously in the caller's thread (grain's own worker processes
and threads do the decoding in the background), so the order of batches and of random draws is unchanged.

Exact resume: ``get_state()`` is the wrapped iterator's state right after the newest *consumed* batch was read, not
its position ahead of the queue, so a checkpoint written after step n restarts at batch n+1 whatever the queue
holds; ``close()`` moves the wrapped iterator back to that position.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Optional


class DevicePrefetch:
    """Iterator of ``place(batch, index)`` over ``iterator``'s batches: each ``next`` first tops the queue up to
    ``size`` placed batches, then hands out the oldest (so ``size - 1`` stay queued while the step runs).

    ``place`` gets each host batch and its 0-based index in this stream (e.g. to poison the batch of a given step)
    and returns what the consumer receives (typically global ``jax.Array``s). ``limit`` bounds how many batches are
    read in all (the steps left), so nothing is read past the last step. ``size=0`` reads and places each batch when
    it is asked for (no prefetch).
    """

    def __init__(self, iterator: Iterator, place: Callable[[Any, int], Any], size: int = 2,
                 limit: Optional[int] = None):
        if size < 0:
            raise ValueError(f"device prefetch size must be >= 0, got {size}")
        self._iterator = iterator
        self._place = place
        self._size = size
        self._limit = limit
        self._queue: collections.deque = collections.deque()
        self._read = 0
        self._exhausted = False
        self._consumed_state = self._iterator_state()

    def _iterator_state(self):
        get_state = getattr(self._iterator, "get_state", None)
        return get_state() if get_state is not None else None

    def _fill(self, target: int) -> None:
        while len(self._queue) < target and not self._exhausted:
            if self._limit is not None and self._read >= self._limit:
                self._exhausted = True
                return
            try:
                host = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append((self._place(host, self._read), self._iterator_state()))
            self._read += 1

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self):
        self._fill(max(self._size, 1))  # top up before taking: the new batches' copies overlap the running step
        if not self._queue:
            raise StopIteration
        batch, self._consumed_state = self._queue.popleft()
        return batch

    @property
    def queued(self) -> int:
        """Batches read and placed but not yet consumed."""
        return len(self._queue)

    def get_state(self):
        """The wrapped iterator's state after the last consumed batch (what a checkpoint must hold)."""
        if not hasattr(self._iterator, "get_state"):
            raise AttributeError(f"{type(self._iterator).__name__} has no get_state")
        return self._consumed_state

    def close(self) -> None:
        """Drop the queued batches and, if any were read ahead, set the wrapped iterator back to the consumed
        position (``set_state``) so that whoever reads it next gets the first unconsumed batch."""
        if self._queue and self._consumed_state is not None and hasattr(self._iterator, "set_state"):
            self._iterator.set_state(self._consumed_state)
        self._queue.clear()
