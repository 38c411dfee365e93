"""A work queue of job keys, with client-go's guarantees (k8s.io/client-go/util/workqueue, queue.go + delaying_queue.go):

- a key waits in the queue at most once, however many watch events name it;
- a key is never handed to two workers at once; one added while a worker holds it is handed out again after `done`;
- `add_after` keeps one timer per key, the earliest: a requeue never postpones a wakeup that is due sooner.

And one lane more: `defer` hands a key that a worker holds out again, still held, once no other key waits (or once it
has waited `DEFER_MAX_SECONDS`): the second half of a pass goes after the first halves of the passes waiting now.

Single event loop, no threads: every method runs on the loop that awaits `get`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable

# The longest a deferred key gives way to newly added ones: under a steady stream of new keys it is still handed out.
# Longer than a burst of 1000 new jobs takes to get its RayJobs on 2 cores (10-12 s): at 10 s the first jobs' second
# halves cut in ahead of the last RayJobs and doubled their p99 (docs/benchmarks.md).
DEFER_MAX_SECONDS = 30.0


class WorkQueue:
    def __init__(self) -> None:
        self._ready: collections.deque[Hashable] = collections.deque()
        self._dirty: set[Hashable] = set()  # waiting in `_ready`, or re-added while processed
        self._processing: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._deferred: collections.deque[tuple[float, Hashable]] = collections.deque()  # (when deferred, key)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._ready) + len(self._deferred)

    def add(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)
            self._wake_one()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def forget(self, key: Hashable) -> None:
        """Drop a key's pending timer (its object is gone); a worker holding it finishes normally."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def defer(self, key: Hashable) -> None:
        """A held key (taken by `get`, not yet `done`) is to be handed out again, still held, after the keys waiting."""
        if key not in self._processing:
            raise ValueError(f"{key!r} is not held by a worker")
        self._deferred.append((asyncio.get_running_loop().time(), key))
        self._wake_one()

    async def get(self) -> Hashable:
        while not self._ready and not self._deferred:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wakeup this cancelled getter received on to another
                raise
        if self._deferred and (
            not self._ready or asyncio.get_running_loop().time() - self._deferred[0][0] >= DEFER_MAX_SECONDS
        ):
            return self._deferred.popleft()[1]
        key = self._ready.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._ready.append(key)
            self._wake_one()

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
