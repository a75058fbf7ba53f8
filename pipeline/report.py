"""What a run teaches: the JSON report, which stage limited it, and live warnings.

The limiting stage is read off the channels. A slow stage keeps the channel that
feeds it full, and that holds back every stage before it, so their channels fill
too: the bottleneck is the furthest downstream stage whose input stayed full for
much of the run. When no channel stayed full, nothing downstream waited on
anything: the source and the first stage set the pace.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pipeline.limit import LimitStats
from pipeline.outcome import RunOutcome
from pipeline.stage_state import StageView

__all__ = ["Watchdog", "build_report", "hints", "report_hints"]

FULL_SHARE_LIMITING = 0.5  # input full for half the run or more: this stage held others back
FUSED_BUSY_LIMITING = 0.8  # a fused stage's threads this busy: it held its host back
CPU_SATURATED = 0.9  # the machine's CPUs this busy over the run: cores, not workers, are short
QUEUE_FULL_WARN_S = 30.0
ITEM_SLOW_WARN_S = 60.0


def _share(part: float, whole: float) -> float:
    return min(1.0, part / whole) if whole > 0 else 0.0


def _percentile(values: Sequence[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def stage_numbers(view: StageView, *, seconds: float) -> dict[str, Any]:
    durations = list(view.durations)
    p50, p95 = _percentile(durations, 50), _percentile(durations, 95)
    return {
        "name": view.name,
        "fused": [f.name for f in view.fused_views],
        "fused_into": view.host,  # a fused stage: the stage whose calls ran it
        "pool": view.kind,
        "workers": view.workers,
        "queue_capacity": None if view.host else view.capacity,  # a fused stage has none
        "items_done": view.done,
        "items_failed": view.failed,
        "retries": view.retries,
        "busy_seconds": round(view.busy_seconds, 3),
        "utilisation": round(_share(view.busy_seconds, seconds * view.workers), 3),
        "queue_full_share": None if view.host else round(_share(view.full_seconds, seconds), 3),
        "p50_batch_seconds": None if p50 is None else round(p50, 4),
        "p95_batch_seconds": None if p95 is None else round(p95, 4),
        "concurrency": _concurrency(view),
        "counters": dict(view.counters),  # e.g. "embedding_requests:200": requests answered
        "nodes": dict(view.nodes),  # items each machine handled (executor ray); {} locally
    }


def _concurrency(view: StageView) -> dict[str, Any] | None:
    """How the adaptive limit moved: where it started, ended, its range and its trace."""
    stats = view.limit_stats
    if stats is None:
        return None
    return {
        "ceiling": stats.ceiling,
        "initial": stats.initial,
        "final": stats.final,
        "lowest": stats.lowest,
        "highest": stats.highest,
        "mean": round(stats.mean, 2),
        "overload_cuts": stats.cuts,
        "fastest_call_seconds": None if stats.floor_s is None else round(stats.floor_s, 4),
        "trace": [[t, limit] for t, limit in stats.trace],
    }


def _server_bound(view: StageView) -> LimitStats | None:
    """The limit's numbers if it stayed below the ceiling: latency rose with load (or
    the server said it was overloaded), so more calls in flight would only queue."""
    stats = view.limit_stats
    return stats if stats is not None and stats.mean < stats.ceiling * 0.9 else None


def hints(
    views: Sequence[StageView],
    *,
    seconds: float,
    cpu_busy: float | None = None,
    processed: int | None = None,
) -> list[str]:
    """One line naming the stage that limited the run and what to change.

    A run that processed nothing (all unchanged) has nothing to tune. When the
    machine's CPUs were saturated, a CPU-bound stage is not short of workers: the
    machine is short of cores. A stage whose server set its adaptive limit below
    the ceiling is never told to add workers: latency rose with load there, so
    more calls would only queue."""
    if not views or seconds <= 0 or processed == 0:
        return []
    saturated = cpu_busy is not None and cpu_busy >= CPU_SATURATED
    limiting = None
    for view in views:
        if _share(view.full_seconds, seconds) >= FULL_SHARE_LIMITING:
            limiting = view
    if limiting is None:
        for view in reversed(views):
            stats = _server_bound(view)
            if stats is not None and _limit_busy(view, seconds) >= 0.5:
                return [_fused_limit(view, seconds) or _server_hint(view, stats, seconds)]
        first = views[0]
        busy = _share(first.busy_seconds, seconds * first.workers)
        if saturated and cpu_busy is not None:
            return [_cpu_hint(first, cpu_busy)]
        return [
            f"{first.name}: no queue stayed full; the source and {first.name} set the pace "
            f"(workers busy {busy:.0%}): raise stages.{first.name}.pool.size if CPUs are idle"
        ]
    fused = _fused_limit(limiting, seconds)
    if fused is not None:
        return [fused]
    stats = _server_bound(limiting)
    if stats is not None:
        return [_server_hint(limiting, stats, seconds)]
    if saturated and cpu_busy is not None and limiting.kind in ("process", "thread"):
        return [_cpu_hint(limiting, cpu_busy)]
    full = _share(limiting.full_seconds, seconds)
    busy = _share(limiting.busy_seconds, seconds * limiting.workers)
    change = {
        "process": f"raise stages.{limiting.name}.pool.size (CPU-bound: one worker per core)",
        "async": f"raise stages.{limiting.name}.pool.size or batch",
        "thread": f"raise stages.{limiting.name}.pool.size or batch",
    }[limiting.kind]
    return [f"{limiting.name}: queue full {full:.0%} of the run, workers busy {busy:.0%}: {change}"]


def _fused_limit(host: StageView, seconds: float) -> str | None:
    """A hint naming the stage fused into `host`'s calls (an async stage's: a store
    after the embedder) if its threads were busy nearly all the run: then its host's
    calls waited on it, and neither the host's server nor its workers were the limit.
    A process pool's fused stages share its CPU-bound workers, whose hints fit them."""
    if host.kind == "process":
        return None
    for fused in host.fused_views:
        busy = _share(fused.busy_seconds, seconds * fused.workers)
        if busy >= FUSED_BUSY_LIMITING:
            return (
                f"{fused.name}: it runs inside the calls of {host.name} (pipeline/fusion.py) "
                f"and its {fused.workers} thread(s) were busy {busy:.0%} of the run: "
                f"{fused.name} is the limit, not {host.name}'s server or workers; raise "
                f"stages.{fused.name}.pool.size if it can take several batches at once"
            )
    return None


def _cpu_hint(view: StageView, cpu_busy: float) -> str:
    return (
        f"{view.name}: the machine's CPUs were the limit ({cpu_busy:.0%} busy, the embedding "
        "server and anything else beside the run included): more workers would share the "
        "same cores; more cores would help"
    )


def _limit_busy(view: StageView, seconds: float) -> float:
    """How much of its adaptive limit a stage used: calls in flight over calls allowed."""
    stats = view.limit_stats
    mean = stats.mean if stats is not None else view.workers
    return _share(view.busy_seconds, seconds * max(mean, 1.0))


def _server_hint(view: StageView, stats: LimitStats, seconds: float) -> str:
    full = _share(view.full_seconds, seconds)
    return (
        f"{view.name}: its server is the limit (queue full {full:.0%} of the run, "
        f"{_limit_busy(view, seconds):.0%} of the allowed calls in flight): latency rose with "
        f"load, so about {stats.mean:.0f} of {stats.ceiling} calls went out at once. More "
        "workers would only queue at the server; a faster server, more replicas or a GPU "
        "would help"
    )


def build_report(outcome: RunOutcome, views: Sequence[StageView]) -> dict[str, Any]:
    """The `--report` JSON: outcomes, per-stage numbers, rates, hints."""
    seconds = outcome.seconds
    per_s = seconds if seconds > 0 else 1e-9
    return {
        **outcome.to_dict(),
        "wall_seconds": round(seconds, 3),
        "docs_per_s": round(outcome.indexed / per_s, 3),
        "pages_per_s": round(outcome.pages / per_s, 3),
        "chunks_per_s": round(outcome.chunks / per_s, 3),
        "stages": [
            stage_numbers(v, seconds=seconds) for host in views for v in (host, *host.fused_views)
        ],
        "hints": report_hints(outcome, views),
    }


def report_hints(outcome: RunOutcome, views: Sequence[StageView]) -> list[str]:
    """The hints for a finished run."""
    processed = outcome.indexed + outcome.failed
    return hints(views, seconds=outcome.seconds, cpu_busy=outcome.cpu_busy, processed=processed)


class Watchdog:
    """Warnings while a run works: a queue that stays full, an item that takes too long.

    Each is said once per stage, so a long stall is one line, not a flood.
    """

    def __init__(
        self, *, queue_full_s: float = QUEUE_FULL_WARN_S, item_slow_s: float = ITEM_SLOW_WARN_S
    ) -> None:
        self.queue_full_s = queue_full_s
        self.item_slow_s = item_slow_s
        self._said: set[tuple[str, str]] = set()

    def check(
        self, views: Sequence[StageView], full_since: dict[str, float | None], now: float
    ) -> list[str]:
        said = []
        for view in views:
            since = full_since.get(view.name)
            if since is not None and now - since >= self.queue_full_s:
                said += self._once(
                    view.name,
                    "queue",
                    f"{view.name}: input queue full for {now - since:.0f} s; "
                    f"{view.name} is holding back the stages before it",
                )
            oldest = min(view.running.values(), default=None)
            if oldest is not None and now - oldest >= self.item_slow_s:
                said += self._once(
                    view.name,
                    "slow",
                    f"{view.name}: a worker has been on one batch for {now - oldest:.0f} s",
                )
        return said

    def _once(self, stage: str, kind: str, text: str) -> list[str]:
        if (stage, kind) in self._said:
            return []
        self._said.add((stage, kind))
        return [text]
