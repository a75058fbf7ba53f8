"""What the runner keeps of one stage during a run, and what it shows of it.

A stage at run time is its pool, the channel feeding it, its retry policy (with
the circuit breaker), its adaptive limit if its pool has one, the verdict on
refusals (`pipeline.systemic`), and the numbers the live view, the metrics and the
report read (`StageView`). The runner drives it; this module only holds and counts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.channel import Channel
from pipeline.config import StageConfig
from pipeline.limit import AdaptiveLimit, LimitStats, Permit
from pipeline.metrics import StageMeters
from pipeline.pools import FusedWork, Pool
from pipeline.retry import RetryPolicy
from pipeline.stage import Item
from pipeline.systemic import SystemicCheck

__all__ = ["DEFAULT_LINGER_MS", "StageState", "StageView"]

DEFAULT_LINGER_MS = 50.0  # a batching stage waits this long at most for a fuller batch


@dataclass(slots=True)
class StageView:
    """What the live view and the metrics show of one stage."""

    name: str
    kind: str
    workers: int
    busy: int = 0
    depth: int = 0
    capacity: int = 0
    done: int = 0
    failed: int = 0
    retries: int = 0
    busy_seconds: float = 0.0
    full_seconds: float = 0.0  # time its input channel was full
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    running: dict[int, float] = field(default_factory=dict)  # batch -> started (monotonic)
    fused_views: tuple[StageView, ...] = ()  # stages that run in this one's workers
    host: str | None = None  # for a fused stage: the stage whose workers run it
    counters: dict[str, int] = field(default_factory=dict)  # the stage's own, "name:label"
    limit: int | None = None  # calls allowed in flight now (adaptive pools)
    limit_stats: LimitStats | None = None
    unavailable_s: float = 0.0  # how long its server has been unavailable, now
    nodes: dict[str, int] = field(default_factory=dict)  # items per machine (Ray)


class StageState:
    """One stage of a running pipeline."""

    meters: StageMeters  # its metric series, set once the runner registers them

    def __init__(
        self, cfg: StageConfig, pool: Pool, inbox: Channel[Item], retry: RetryPolicy
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.inbox = inbox
        self.retry = retry
        self.batch_size = pool.batch_size
        linger_ms = cfg.linger_ms if cfg.linger_ms is not None else DEFAULT_LINGER_MS
        self.linger = linger_ms / 1000 if pool.batch_size > 1 else 0.0
        self.view = StageView(cfg.name, pool.kind, pool.size, capacity=inbox.capacity)
        # A stage fused into a process pool's runs in each of its workers; one fused
        # into an async pool's process, on threads of its own (pipeline.fusion).
        self.view.fused_views = tuple(
            StageView(
                f.name, "fused", pool.size if pool.kind == "process" else f.pool.size,
                host=cfg.name,
            )
            for f in cfg.fused
        )  # fmt: skip
        self._fused_views = {v.name: v for v in self.view.fused_views}
        self.fused_meters: dict[str, StageMeters] = {}  # set with `meters`
        self.limit = AdaptiveLimit(pool.size) if cfg.pool.adaptive else None
        self.systemic = SystemicCheck(cfg.name)
        # Coroutines driving the pool: a worker process gets its next document while
        # it works on one, so it never waits a round trip for work.
        self.drivers = pool.size * (2 if pool.kind == "process" else 1)
        self._in_flight = 0
        self._since = time.monotonic()

    def depth(self) -> float:
        return self.inbox.depth

    def busy(self) -> float:
        return self.view.busy

    def allowed(self) -> float:
        """Calls it may have in flight now: the adaptive limit, or the pool's size."""
        return self.limit.limit if self.limit is not None else self.pool.size

    def give_back(self, permit: Permit | None) -> None:
        """Return an adaptive-limit slot that carried no call."""
        if self.limit is not None and permit is not None:
            self.limit.release(permit, size=0)

    def track_busy(self, change: int) -> float:
        """Count a call starting (+1) or ending (-1); returns the worker-seconds since
        the last change. A process pool has two calls in flight per worker (one
        running, one queued): busy is the calls in flight, up to the workers there are."""
        now = time.monotonic()
        seconds = min(self._in_flight, self.pool.size) * (now - self._since)
        self.view.busy_seconds += seconds
        self._since = now
        self._in_flight += change
        self.view.busy = min(self._in_flight, self.pool.size)
        return seconds

    def count_fused(self, work: Sequence[FusedWork]) -> int:
        """Count what the fused stages did under their own names, in their views and
        series; returns the pages they consumed."""
        for done in work:
            view, meters = self._fused_views[done.stage], self.fused_meters[done.stage]
            view.done += done.items
            view.busy_seconds += done.seconds
            view.durations.append(done.seconds)
            meters.items_ok.inc(done.items)
            meters.seconds.observe(done.seconds)
            meters.busy_seconds.inc(done.seconds)
        return sum(done.pages for done in work)

    def count_failed(self, stage: str | None) -> None:
        """Count an item that failed in this stage's call, under the fused stage that
        failed it, if one did (the host counts it too: its call failed)."""
        view = self._fused_views.get(stage or "")
        if view is not None:
            view.failed += 1
            self.fused_meters[view.name].items_failed.inc()

    def refresh(self) -> StageView:
        """The view, with the numbers read when asked brought up to date."""
        view = self.view
        view.depth = self.inbox.depth
        view.full_seconds = self.inbox.full_seconds()
        view.unavailable_s = self.retry.breaker.open_seconds()
        counts = self.pool.stage.counts
        view.counters = {f"{name}:{label}": n for (name, label), n in counts.items()}
        view.nodes = self.pool.nodes()
        if self.limit is not None:
            view.limit = self.limit.limit
            view.limit_stats = self.limit.stats()
        return view
