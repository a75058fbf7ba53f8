"""Bounded channels that close: the joints between stages.

The capacity is what keeps memory flat. A full channel makes `put` wait, so a
slow embedding API stops extraction, which stops the source reading files: the
corpus never has to fit in memory, only the capacities do. A channel that grows
without bound (`asyncio.Queue()` with maxsize 0) would turn a slow stage into an
ever-growing backlog instead of a signal upstream.

Closing is how end-of-input travels: after the producers close, readers drain
what is buffered and then see the end exactly once; `put` raises ChannelClosed.
No sentinel rides in-band, so no stage can mistake data for a control message.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Channel", "ChannelClosed", "ChannelStats"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """`put` on a channel that was closed: the consumer side has stopped intake."""


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """A snapshot for metrics and the live view."""

    depth: int
    capacity: int
    waiting_senders: int
    waiting_receivers: int
    closed: bool


class Channel(Generic[T]):
    """A FIFO of at most `capacity` items, shared by many senders and receivers."""

    def __init__(self, capacity: int, *, on_change: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._closed = False
        self._lock = asyncio.Lock()
        self._filling = asyncio.Lock()  # one lingering reader at a time
        self._not_full = asyncio.Condition(self._lock)
        self._not_empty = asyncio.Condition(self._lock)
        self._waiting_senders = 0
        self._waiting_receivers = 0
        self._on_change = on_change or _nothing
        self._wakers: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly
        self._full_since: float | None = None
        self._full_seconds = 0.0

    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def full_seconds(self) -> float:
        """How long the channel has been full in all: the time its producers were held back."""
        ongoing = time.monotonic() - self._full_since if self._full_since is not None else 0.0
        return self._full_seconds + ongoing

    def full_since(self) -> float | None:
        """When the channel last became full (time.monotonic), if it is full now."""
        return self._full_since

    def statistics(self) -> ChannelStats:
        return ChannelStats(
            depth=len(self._items),
            capacity=self.capacity,
            waiting_senders=self._waiting_senders,
            waiting_receivers=self._waiting_receivers,
            closed=self._closed,
        )

    async def put(self, item: T) -> None:
        """Add `item`, waiting while the channel is full: that wait is the backpressure.

        Raises ChannelClosed if the channel is closed before or while waiting.
        """
        await self.put_many((item,))

    async def put_many(self, items: Sequence[T]) -> None:
        """Add `items` in order, as many at a time as there is room for, waiting while
        the channel is full: as `put` each in turn, for one lock round trip per fill
        instead of one per item (a document's chunks arrive together).

        Raises ChannelClosed if the channel is closed before or while waiting; the
        items before that point were added.
        """
        done = 0
        async with self._lock:
            while done < len(items):
                while len(self._items) >= self.capacity and not self._closed:
                    self._waiting_senders += 1
                    self._on_change()
                    try:
                        await self._not_full.wait()
                    finally:
                        self._waiting_senders -= 1
                if self._closed:
                    raise ChannelClosed
                room = self.capacity - len(self._items)
                added = items[done : done + room]
                self._items.extend(added)
                done += len(added)
                if len(self._items) >= self.capacity:
                    self._full_since = time.monotonic()
                self._not_empty.notify(len(added))
                self._on_change()

    async def get_batch(self, most: int, *, linger: float = 0.0) -> list[T]:
        """Wait for at least one item, then take up to `most`, lingering up to `linger`
        seconds for more while the batch is short.

        Without linger a half-empty batch goes at once. With it, a batching stage
        fed in bursts (one document's chunks at a time) sends full requests instead
        of one per document, and a lone document waits at most `linger`. One reader
        fills at a time, so readers do not split the flow into small batches among
        them. Returns [] once the channel is closed and drained.
        """
        if linger <= 0:
            async with self._lock:
                return await self._take(most, deadline=None)
        async with self._filling, self._lock:
            return await self._take(most, deadline=asyncio.get_running_loop().time() + linger)

    async def _take(self, most: int, *, deadline: float | None) -> list[T]:
        """Take under the lock: at least one item, then more until `deadline`."""
        while not self._items and not self._closed:
            self._waiting_receivers += 1
            self._on_change()
            try:
                await self._not_empty.wait()
            finally:
                self._waiting_receivers -= 1
        taken: list[T] = []
        self._pop(taken, most)
        loop = asyncio.get_running_loop()
        while deadline is not None and taken and len(taken) < most and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._waiting_receivers += 1  # so that close() wakes a lingering reader too
            try:
                async with asyncio.timeout(remaining):
                    await self._not_empty.wait()
            except TimeoutError:
                break
            finally:
                self._waiting_receivers -= 1
            self._pop(taken, most)
        if self._items:
            self._not_empty.notify()
        self._on_change()
        return taken

    def _pop(self, taken: list[T], most: int) -> None:
        count = min(most - len(taken), len(self._items))
        if count <= 0:
            return
        if count == len(self._items):
            taken.extend(self._items)
            self._items.clear()
        else:
            popleft = self._items.popleft
            taken.extend([popleft() for _ in range(count)])
        if self._full_since is not None:
            self._full_seconds += time.monotonic() - self._full_since
            self._full_since = None
        self._not_full.notify(count)

    def close(self) -> None:
        """Stop intake: waiting and future senders get ChannelClosed, readers drain.

        Safe to call from synchronous code and more than once; waiters are woken
        by a task because the conditions need the lock.
        """
        if self._closed:
            return
        self._closed = True
        self._on_change()
        if not self._lock.locked() and not self._waiting_senders and not self._waiting_receivers:
            return
        task = asyncio.get_running_loop().create_task(self._wake_all())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _wake_all(self) -> None:
        async with self._lock:
            self._not_full.notify_all()
            self._not_empty.notify_all()

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        batch = await self.get_batch(1)
        if not batch:
            raise StopAsyncIteration
        return batch[0]


def _nothing() -> None:
    return None
