"""Retrying transient failures: capped exponential backoff, full jitter, Retry-After.

Only TransientError is retried (the stage decided at its edge what is worth
another try); PermanentError and FatalError go straight through. A server's
Retry-After wins over our own backoff when it asks for longer. A 429 cools the
whole pool, not one worker: sixty-four workers each backing off on their own
would keep hammering a server that asked all of us to wait.

An error that says the server is not there at all (`unavailable`: connection
refused, 502/503/504) is not the document's problem: it costs no attempt, and
the next try waits on the pool's circuit breaker (`pipeline.breaker`), which
lets one probe out at a time for up to `max_wait_s` before the run stops.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pipeline.breaker import Breaker
from pipeline.errors import StageError, TransientError

__all__ = ["Cooldown", "RetryPolicy", "backoff"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry `attempt` (1-based).

    Full jitter, so workers hit by one 429 do not return in step; capped, so no
    worker sleeps past the SIGTERM grace period.
    """
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


class Cooldown:
    """A pool-wide pause: every worker waits it out before its next request."""

    def __init__(self, *, sleep: Sleep = asyncio.sleep, clock: Callable[[], float] | None = None):
        self._sleep = sleep
        self._clock = clock or _monotonic
        self._until = 0.0

    def extend(self, seconds: float) -> None:
        self._until = max(self._until, self._clock() + seconds)

    async def wait(self) -> None:
        remaining = self._until - self._clock()
        if remaining > 0:
            await self._sleep(remaining)


class RetryPolicy:
    """How one stage retries: `attempts` tries in all, backoff between them, and the
    breaker that holds the pool while its server is unavailable."""

    def __init__(
        self,
        *,
        attempts: int,
        base: float,
        cap: float,
        max_wait_s: float = 180.0,
        name: str = "stage",
        sleep: Sleep = asyncio.sleep,
        on_retry: Callable[[TransientError], None] | None = None,
    ) -> None:
        self.attempts = attempts
        self.base = base
        self.cap = cap
        self.cooldown = Cooldown(sleep=sleep)
        self.breaker = Breaker(name=name, budget_s=max_wait_s, base_s=base, cap_s=cap)
        self._sleep = sleep
        self._on_retry = on_retry or _ignore

    def delay(self, failures: int, error: TransientError) -> float:
        """Seconds before the next try after `failures` failed ones."""
        delay = backoff(failures, base=self.base, cap=self.cap)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        if error.cool_pool:
            self.cooldown.extend(delay)
        return delay

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn`, retrying TransientError; the last error is raised as itself."""
        failures = 0
        while True:
            probe = await self.breaker.admit()
            settled = False
            try:
                await self.cooldown.wait()
                try:
                    result = await fn()
                except TransientError as exc:
                    if exc.unavailable:
                        self.breaker.failed(probe=probe, reason=str(exc))
                        settled = True
                        self._on_retry(exc)
                        continue
                    self.breaker.answered(probe=probe)
                    settled = True
                    failures += 1
                    if failures >= self.attempts:
                        raise
                    self._on_retry(exc)
                    await self._sleep(self.delay(failures, exc))
                    continue
                except StageError:
                    self.breaker.answered(probe=probe)
                    settled = True
                    raise
                self.breaker.answered(probe=probe)
                settled = True
                return result
            finally:
                if not settled:
                    self.breaker.abandon(probe=probe)


def _ignore(error: TransientError) -> None:
    del error


def _monotonic() -> float:
    return asyncio.get_running_loop().time()
