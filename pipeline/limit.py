"""Adaptive concurrency: how many calls of a stage may be in flight at once.

`pool.size` is the ceiling, not the setting. A model server on a CPU computes a
few requests at a time and queues the rest; sending it 64 at once only makes
every request wait longer, until they time out and are sent again while the
server still computes the abandoned copies. So the limit is found from what the
server does, as Netflix's concurrency-limits (Gradient2, Vegas) and Envoy's
adaptive concurrency filter do it:

- **Latency against its floor.** The floor is what a request of that size takes
  when nothing waits in front of it: the larger of the fastest call seen and the
  fastest time per item times the size, so batches of any size compare fairly
  (a fixed-latency API and a server whose time grows with the batch alike). A call
  slower than `tolerance` times its floor waited in a queue: the server serves about
  `in_flight / ratio` calls at once, and the limit drops to that plus a little
  headroom (square-root of it), so the server is never idle and never buried.
- **Overload signals.** A timeout, a 429 or a 503 halves the limit, once per
  round trip (the calls already in flight when it was cut say nothing new). The cut
  happens when the error arrives, before anything is resent.
- **Growth.** While latency stays flat (within 1.5x its floor) and the limit is
  in use, it grows: doubling each round trip until the first cut (slow start),
  then by about its square root per round trip. Between 1.5x and 2x it holds.
  It starts at 2, so the first round trip cannot bury a slow server.

The limit never goes below 1 or above the ceiling. Acquiring is first come,
first served.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "LimitStats", "Permit"]

TOLERANCE = 2.0  # a call this many times slower than its floor waited in a queue
FLAT = 1.5  # ... and one within this of its floor did not: the limit may grow
SLACK_S = 0.005  # latency differences below this are noise, not queueing
_TRACE_KEPT = 512  # changes of the limit kept for the report (older ones thinned out)


@dataclass(slots=True)
class Permit:
    """One slot, held from `acquire` to `release`; `begin` marks the call's start."""

    started: float | None = None  # None until the call begins
    held: int = 0  # slots held when the call began, this one included
    epoch: int = 0  # cuts made before the call began


@dataclass(frozen=True, slots=True)
class LimitStats:
    """What the report says about how the limit moved."""

    ceiling: int
    initial: int
    final: int
    lowest: int
    highest: int
    cuts: int
    mean: float  # the limit averaged over time
    floor_s: float | None  # fastest call seen
    trace: list[tuple[float, int]]  # (seconds since start, limit) at each change


class AdaptiveLimit:
    """A semaphore whose size follows the latency and overload signals of its calls."""

    def __init__(
        self,
        ceiling: int,
        *,
        initial: int = 2,
        tolerance: float = TOLERANCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"the ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.tolerance = tolerance
        self._clock = clock
        self._value = float(min(ceiling, max(1, initial)))
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slow_start = True
        self._epoch = 0  # bumped by each overload cut
        self._floor_call = math.inf  # fastest call, seconds
        self._floor_item = math.inf  # fastest seconds per item
        self._born = clock()
        self._initial = int(self._value)
        self._lowest = self._highest = int(self._value)
        self._trace: list[tuple[float, int]] = [(0.0, int(self._value))]
        self._area = 0.0  # integral of the limit over time, for its mean
        self._since = self._born

    @property
    def limit(self) -> int:
        return int(self._value)

    @property
    def held(self) -> int:
        return self._held

    async def acquire(self) -> Permit:
        """Wait for a free slot (first come, first served)."""
        if self._held < self.limit and not self._waiters:
            self._held += 1
            return Permit()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._held -= 1  # granted as we were cancelled: give it back
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return Permit()

    def take(self) -> Permit:
        """A slot at once, over the limit if need be: for the circuit breaker's probe,
        which calls holding slots are waiting on (waiting for theirs would deadlock)."""
        self._held += 1
        return Permit()

    def begin(self, permit: Permit) -> None:
        """The call starts now: latency is measured from here."""
        permit.started = self._clock()
        permit.held = self._held
        permit.epoch = self._epoch

    def release(self, permit: Permit, *, size: int = 0, overloaded: bool = False) -> None:
        """Give the slot back, learning from the call (see `observe`)."""
        self.observe(permit, size=size, overloaded=overloaded)
        self._held -= 1
        self._wake()

    def observe(self, permit: Permit, *, size: int = 0, overloaded: bool = False) -> None:
        """Learn from a call: a success measured from `begin` (size = items in the
        call), an overload (timeout, 429, 503), or neither (`size=0`: the call never
        reached the server, or failed for its input)."""
        if overloaded:
            self._cut(permit)
        elif size > 0 and permit.started is not None:
            self._learn(permit, self._clock() - permit.started, size, self._held)

    def _learn(self, permit: Permit, seconds: float, size: int, in_flight: int) -> None:
        self._floor_call = min(self._floor_call, seconds)
        self._floor_item = min(self._floor_item, seconds / size)
        floor = max(self._floor_call, self._floor_item * size)
        ratio = seconds / (floor + SLACK_S)
        if ratio > self.tolerance:
            served = max(1.0, permit.held / ratio)  # what the server computes at once
            target = served + math.sqrt(served)
            if target < self._value:
                self._slow_start = False
                self._set(target)
        elif ratio <= FLAT and max(permit.held, in_flight) * 2 >= self._value:  # in use
            growth = 1.0 if self._slow_start else 1.0 / math.sqrt(self._value)
            self._set(self._value + growth)

    def _cut(self, permit: Permit) -> None:
        self._slow_start = False
        if permit.epoch != self._epoch:
            return  # began before the last cut: that cut already answered it
        self._epoch += 1
        self._set(self._value / 2)

    def _set(self, value: float) -> None:
        before = self.limit
        self._value = min(float(self.ceiling), max(1.0, value))
        after = self.limit
        if after != before:
            now = self._clock()
            self._area += before * (now - self._since)
            self._since = now
            self._lowest = min(self._lowest, after)
            self._highest = max(self._highest, after)
            self._trace.append((round(now - self._born, 3), after))
            if len(self._trace) > _TRACE_KEPT:
                del self._trace[1:-1:2]  # thin out, keeping the first and the last

    def _wake(self) -> None:
        while self._waiters and self._held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._held += 1
                waiter.set_result(None)

    def stats(self) -> LimitStats:
        now = self._clock()
        area = self._area + self.limit * (now - self._since)
        return LimitStats(
            ceiling=self.ceiling,
            initial=self._initial,
            final=self.limit,
            lowest=self._lowest,
            highest=self._highest,
            cuts=self._epoch,
            mean=area / (now - self._born) if now > self._born else float(self.limit),
            floor_s=None if math.isinf(self._floor_call) else self._floor_call,
            trace=list(self._trace),
        )
