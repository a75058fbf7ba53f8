"""Prometheus metrics of one run, on a registry the run owns.

Metrics count, logs tell: what an operator graphs (queue depth, busy workers,
durations, counts) lives here, labelled by stage, outcome or reason, never by
document, so label cardinality stays bounded however large the corpus.
Queue depths and busy workers are read when scraped (callback gauges), so the
hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pipeline.stage import StageBase

__all__ = ["Metrics", "StageMeters"]

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class StageMeters(NamedTuple):
    """One stage's labelled series, looked up once: `labels()` costs more than the
    increment it leads to, and the runner counts several times per batch."""

    items_ok: Any
    items_failed: Any
    seconds: Any
    busy_seconds: Any


class Metrics:
    """Every metric of a run; the runner updates it, the CLI may serve it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stage_counters: dict[str, _StageCounters] = {}
        r = self.registry
        self.source_documents = Counter(
            "pipeline_source_documents", "Documents the source has handed on", registry=r
        )
        self.documents = Counter(
            "pipeline_documents", "Documents finished, by status", ["status"], registry=r
        )
        self.queue_depth = Gauge(
            "pipeline_queue_depth",
            "Items waiting in the channel feeding a stage",
            ["stage"],
            registry=r,
        )
        self.queue_capacity = Gauge(
            "pipeline_queue_capacity",
            "Capacity of the channel feeding a stage",
            ["stage"],
            registry=r,
        )
        self.workers_busy = Gauge(
            "pipeline_workers_busy", "Workers of a stage working on a batch", ["stage"], registry=r
        )
        self.workers = Gauge("pipeline_workers", "Workers of a stage", ["stage"], registry=r)
        self.concurrency_limit = Gauge(
            "pipeline_concurrency_limit",
            "Calls a stage may have in flight now (adaptive pools follow the server)",
            ["stage"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "pipeline_stage_seconds",
            "Time one call of a stage took (one batch, one attempt)",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.busy_seconds = Counter(
            "pipeline_stage_busy_seconds",
            "Worker-seconds a stage spent working",
            ["stage"],
            registry=r,
        )
        self.items = Counter(
            "pipeline_items",
            "Items a stage finished, by outcome",
            ["stage", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "pipeline_retries", "Retries of transient failures", ["stage", "reason"], registry=r
        )
        self.dead_letters = Gauge(
            "pipeline_dead_letters", "Documents in the dead-letter store (failed)", registry=r
        )

    def watch_stage(
        self,
        stage: str,
        *,
        capacity: int,
        workers: int,
        depth: Callable[[], float],
        busy: Callable[[], float],
        limit: Callable[[], float],
    ) -> StageMeters:
        """Show the stage's queue and workers; returns its series to count into."""
        self.queue_capacity.labels(stage).set(capacity)
        self.concurrency_limit.labels(stage).set_function(limit)
        self.queue_depth.labels(stage).set_function(depth)
        self.workers_busy.labels(stage).set_function(busy)
        return self.watch_fused(stage, workers=workers)

    def watch_fused(self, stage: str, *, workers: int) -> StageMeters:
        """A stage's workers and the series it counts into; alone, those of a stage fused
        into another (pipeline.fusion), which has no queue or busy workers of its own."""
        self.workers.labels(stage).set(workers)
        return StageMeters(
            items_ok=self.items.labels(stage, "ok"),
            items_failed=self.items.labels(stage, "failed"),
            seconds=self.stage_seconds.labels(stage),
            busy_seconds=self.busy_seconds.labels(stage),
        )

    def watch_counters(self, stage: StageBase) -> None:
        """Export the counters a stage keeps itself (its COUNTERS), read at scrape time.

        A later run on the same metrics (`pipeline watch`) replaces the stage's
        earlier copy; its counts carry on from where that one's ended."""
        if not stage.COUNTERS:
            return
        old = self._stage_counters.pop(stage.name, None)
        if old is not None:
            self.registry.unregister(old)
            stage.counts.update(old.stage.counts)
        collector = _StageCounters(stage)
        self.registry.register(collector)
        self._stage_counters[stage.name] = collector

    def serve(self, port: int, *, host: str = "127.0.0.1") -> Any:
        """Serve /metrics for the life of the run; returns the server to shut down."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _StageCounters(Collector):
    """`pipeline_<counter>_total{stage, <label>}` from a stage's own `counts`."""

    def __init__(self, stage: StageBase) -> None:
        self.stage = stage

    def describe(self) -> Iterator[CounterMetricFamily]:
        return self.collect()

    def collect(self) -> Iterator[CounterMetricFamily]:
        stage = self.stage
        for counter, (label, doc) in stage.COUNTERS.items():
            family = CounterMetricFamily(f"pipeline_{counter}", doc, labels=["stage", label])
            for (name, value), n in list(stage.counts.items()):
                if name == counter:
                    family.add_metric([stage.name, value], n)
            yield family
