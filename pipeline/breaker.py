"""A circuit breaker: when the server is gone, the whole pool waits on one probe.

A model server restarting takes tens of seconds to load its model. If each of 64
workers retried on its own, every document would burn its attempts in the first
few seconds and fail. Instead, the first "unavailable" error (connection
refused or reset, 502/503/504) opens the breaker: every worker waits, one call
at a time goes out as a probe (with capped exponential backoff between probes),
and the first probe that gets an answer closes it for everyone. Waiting here
costs no attempts.

A server that stays away longer than `budget_s` is not coming back within this
run: the breaker raises FatalError for every waiter, the run stops with exit 3
and the documents in flight stay pending for the next run, instead of all being
dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pipeline.errors import FatalError

__all__ = ["Breaker"]

logger = logging.getLogger(__name__)


class Breaker:
    """Closed (calls go out) or open (one probe at a time, the rest wait)."""

    def __init__(
        self,
        *,
        name: str,
        budget_s: float,
        base_s: float,
        cap_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.budget_s = budget_s
        self.base_s = max(base_s, 0.05)
        self.cap_s = max(cap_s, self.base_s)
        self._clock = clock
        self._opened: float | None = None  # when it opened; None while closed
        self._probing = False
        self._next_probe = 0.0
        self._probes = 0
        self._reason = ""
        self._closed = asyncio.Event()
        self._closed.set()

    @property
    def open(self) -> bool:
        return self._opened is not None

    @property
    def probes(self) -> int:
        """Probes that found the server still gone since the breaker last opened."""
        return self._probes

    def open_seconds(self) -> float:
        return 0.0 if self._opened is None else self._clock() - self._opened

    async def admit(self) -> bool:
        """Wait until a call may go out; True if this call is the probe.

        Raises FatalError once the breaker has been open for `budget_s`.
        """
        while self._opened is not None:
            waited = self._clock() - self._opened
            if waited >= self.budget_s:
                raise FatalError(
                    f"{self.name}: the server did not come back within {self.budget_s:g} s "
                    f"(retry.max_wait_s): {self._reason}"
                )
            now = self._clock()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                return True
            until = self._next_probe if not self._probing else now + self.cap_s
            wake = min(until, self._opened + self.budget_s) - now
            self._closed.clear()
            try:
                async with asyncio.timeout(max(wake, 0.001)):
                    await self._closed.wait()
            except TimeoutError:
                pass
        return False

    def failed(self, *, probe: bool, reason: str) -> None:
        """A call found the server unavailable: open (or keep open) the breaker."""
        now = self._clock()
        self._reason = reason
        if self._opened is None:
            self._opened = now
            self._probes = 0
            self._next_probe = now + self.base_s
            logger.warning(
                "%s: server unavailable (%s); pausing, probing for up to %g s",
                self.name,
                reason,
                self.budget_s,
            )
        if probe:
            self._probing = False
            self._probes += 1
            self._next_probe = now + min(self.cap_s, self.base_s * 2**self._probes)

    def answered(self, *, probe: bool) -> None:
        """A call got an answer from the server (any answer): close the breaker."""
        if probe:
            self._probing = False
        if self._opened is not None:
            logger.warning(
                "%s: server back after %.1f s; resuming", self.name, self._clock() - self._opened
            )
            self._opened = None
            self._closed.set()

    def abandon(self, *, probe: bool) -> None:
        """A call ended without a verdict (cancelled): let another probe go."""
        if probe:
            self._probing = False
            self._closed.set()  # wake waiters so one of them probes
