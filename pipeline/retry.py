"""Retrying transient failures: capped exponential backoff, full jitter, Retry-After.

The loop itself is tenacity's; what is ours is the policy. Only TransientError is
retried (the stage decided at its edge what is worth another try); PermanentError
and FatalError go straight through. A server's Retry-After wins over our own
backoff when it asks for longer. A 429 cools the whole pool, not one worker:
sixty-four workers each backing off on their own would keep hammering a server
that asked all of us to wait.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from pipeline.errors import TransientError

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
    """How one stage retries: `attempts` tries in all, backoff between them."""

    def __init__(
        self,
        *,
        attempts: int,
        base: float,
        cap: float,
        sleep: Sleep = asyncio.sleep,
        on_retry: Callable[[TransientError], None] | None = None,
    ) -> None:
        self.attempts = attempts
        self.base = base
        self.cap = cap
        self.cooldown = Cooldown(sleep=sleep)
        self._sleep = sleep
        self._on_retry = on_retry

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        delay = backoff(state.attempt_number, base=self.base, cap=self.cap)
        if isinstance(error, TransientError):
            if error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if error.cool_pool:
                self.cooldown.extend(delay)
        return delay

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if self._on_retry is not None and isinstance(error, TransientError):
            self._on_retry(error)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn`, retrying TransientError; the last error is raised as itself."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.cooldown.wait()
                return await fn()
        raise AssertionError("unreachable: tenacity either returns or reraises")


def _monotonic() -> float:
    return asyncio.get_running_loop().time()
