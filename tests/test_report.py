"""The live view, the hints, the report and the metrics, from plain numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml
from rich.console import Console

from pipeline.limit import LimitStats
from pipeline.metrics import Metrics
from pipeline.outcome import RunOutcome
from pipeline.report import Watchdog, build_report, hints
from pipeline.schema import json_schema
from pipeline.stage import StageBase
from pipeline.stage_state import StageView
from pipeline.terminal import render_frame

REPO = Path(__file__).resolve().parents[1]


def views(*, embed_full: float, embed_busy: float, seconds: float) -> list[StageView]:
    return [
        StageView("extract", "process", 2, busy=2, depth=4, capacity=4, done=40,
                  busy_seconds=2 * seconds, full_seconds=0.95 * seconds),
        StageView("chunk", "thread", 1, busy=0, depth=2, capacity=2, done=40,
                  busy_seconds=0.1 * seconds, full_seconds=0.93 * seconds),
        StageView("embed", "async", 64, busy=64, depth=128, capacity=128, done=900, retries=3,
                  busy_seconds=embed_busy * 64 * seconds, full_seconds=embed_full * seconds),
        StageView("store", "thread", 1, busy=0, depth=0, capacity=2, done=850,
                  busy_seconds=0.05 * seconds, full_seconds=0.0),
    ]  # fmt: skip


def test_the_live_view_renders_a_frame_from_a_snapshot() -> None:
    outcome = RunOutcome(discovered=50, indexed=30, skipped=5, failed=2, chunks=900, pages=300)
    outcome.walk_complete = True
    console = Console(record=True, width=120, color_system=None)
    console.print(render_frame(outcome, views(embed_full=0.9, embed_busy=1.0, seconds=10),
                               elapsed=10.0))  # fmt: skip
    text = console.export_text()
    assert "37/50 documents (30 indexed, 5 skipped, 2 failed)" in text
    assert "30.0 pages/s" in text and "90.0 chunks/s" in text and "ETA 4s" in text
    assert "64/64" in text and "██████████ 128/128" in text
    assert all(name in text for name in ("extract", "chunk", "embed", "store"))


def test_the_hint_names_the_furthest_stage_whose_queue_stayed_full() -> None:
    said = hints(views(embed_full=0.91, embed_busy=1.0, seconds=100), seconds=100)
    assert said == [
        "embed: queue full 91% of the run, workers busy 100%: raise stages.embed.pool.size or batch"
    ]


def test_with_no_queue_full_the_first_stage_sets_the_pace() -> None:
    quiet = [StageView("extract", "process", 2, busy_seconds=190.0),
             StageView("embed", "async", 8, busy_seconds=10.0)]  # fmt: skip
    assert hints(quiet, seconds=100)[0].startswith("extract: no queue stayed full")


def limited(*, mean: float, final: int, ceiling: int = 64) -> LimitStats:
    return LimitStats(ceiling=ceiling, initial=4, final=final, lowest=1, highest=6, cuts=0,
                      mean=mean, floor_s=0.5, trace=[(0.0, 4), (3.0, 2)])  # fmt: skip


def test_a_server_that_set_the_limit_is_never_answered_with_more_workers() -> None:
    full = views(embed_full=0.91, embed_busy=2 / 64, seconds=100)
    full[2].limit_stats = limited(mean=2.0, final=2)
    said = hints(full, seconds=100)
    assert len(said) == 1 and said[0].startswith("embed: its server is the limit")
    assert "about 2 of 64 calls" in said[0] and "pool.size" not in said[0]
    # Its queue never filled (a corpus smaller than the queue), but the limit was in use:
    quiet = views(embed_full=0.0, embed_busy=1.8 / 64, seconds=100)
    for view in quiet:
        view.full_seconds = 0.0
    quiet[2].limit_stats = limited(mean=2.0, final=2)
    assert hints(quiet, seconds=100)[0].startswith("embed: its server is the limit")


def test_a_limit_at_its_ceiling_leaves_the_usual_hint() -> None:
    full = views(embed_full=0.91, embed_busy=1.0, seconds=100)
    full[2].limit_stats = limited(mean=63.0, final=64)
    assert "raise stages.embed.pool.size or batch" in hints(full, seconds=100)[0]


def test_the_live_view_and_report_show_the_limit() -> None:
    shown = views(embed_full=0.5, embed_busy=0.1, seconds=10)
    shown[2].limit, shown[2].limit_stats = 2, limited(mean=2.5, final=2)
    shown[1].unavailable_s = 12.0
    console = Console(record=True, width=140, color_system=None)
    console.print(render_frame(RunOutcome(), shown, elapsed=10.0))
    text = console.export_text()
    assert "limit" in text and "paused 12s" in text
    row = next(line for line in text.splitlines() if line.startswith("│ embed"))
    assert re.search(r"│\s+2 │", row)
    report = build_report(RunOutcome(seconds=10.0), shown)
    concurrency = report["stages"][2]["concurrency"]
    assert concurrency["ceiling"] == 64 and concurrency["trace"] == [[0.0, 4], [3.0, 2]]
    assert report["stages"][0]["concurrency"] is None


def test_saturated_cpus_are_named_instead_of_more_workers() -> None:
    full = views(embed_full=0.0, embed_busy=0.01, seconds=100)
    said = hints(full, seconds=100, cpu_busy=0.97, processed=10)
    assert said[0].startswith("chunk: the machine's CPUs were the limit (97% busy")
    assert "pool.size" not in said[0]
    quiet = [StageView("extract", "process", 2, busy_seconds=190.0)]
    assert "CPUs were the limit" in hints(quiet, seconds=100, cpu_busy=0.95, processed=10)[0]
    assert "raise stages.extract.pool.size" in hints(quiet, seconds=100, cpu_busy=0.5)[0]


def test_a_run_that_processed_nothing_gives_no_hint() -> None:
    assert hints(views(embed_full=0.9, embed_busy=1.0, seconds=10), seconds=10, processed=0) == []


def test_the_watchdog_warns_once_per_stage() -> None:
    watchdog = Watchdog(queue_full_s=30, item_slow_s=60)
    stalled = StageView("embed", "async", 2, running={1: 0.0})
    assert watchdog.check([stalled], {"embed": 50.0}, now=59.0) == []  # neither limit reached
    first = watchdog.check([stalled], {"embed": 20.0}, now=61.0)
    assert first == [
        "embed: input queue full for 41 s; embed is holding back the stages before it",
        "embed: a worker has been on one batch for 61 s",
    ]
    assert watchdog.check([stalled], {"embed": 20.0}, now=200.0) == []


def test_the_report_carries_rates_percentiles_and_hints() -> None:
    outcome = RunOutcome(discovered=10, indexed=7, failed=1, skipped=2, chunks=70, pages=20)
    outcome.seconds = 10.0
    stage = views(embed_full=0.9, embed_busy=1.0, seconds=10)
    stage[2].durations.extend([0.1] * 90 + [1.0] * 10)
    report = build_report(outcome, stage)
    assert report["indexed"] + report["failed"] + report["skipped"] == report["discovered"]
    assert (report["docs_per_s"], report["pages_per_s"], report["chunks_per_s"]) == (0.7, 2, 7)
    embed = report["stages"][2]
    assert embed["p50_batch_seconds"] == 0.1 and embed["p95_batch_seconds"] == 1.0
    assert embed["queue_full_share"] == 0.9 and embed["utilisation"] == 1.0
    assert report["hints"][0].startswith("embed: queue full 90%")


def test_a_stage_counter_is_exported_as_a_labelled_metric() -> None:
    class Counting(StageBase):
        COUNTERS = {"embedding_requests": ("code", "requests by status")}

    stage = Counting({}, name="embed")
    metrics = Metrics()
    metrics.watch_counters(stage)
    stage.increment("embedding_requests", "200")
    stage.increment("embedding_requests", "200")
    stage.increment("embedding_requests", "429")
    value = metrics.registry.get_sample_value
    assert value("pipeline_embedding_requests_total", {"stage": "embed", "code": "200"}) == 2
    assert value("pipeline_embedding_requests_total", {"stage": "embed", "code": "429"}) == 1


def test_the_shipped_pipeline_yaml_passes_the_schema() -> None:
    config = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    jsonschema.validate(config, json_schema())
    shipped = json.loads((REPO / "pipeline.schema.json").read_text())
    assert shipped == json_schema()


def fused_into_embed(*, store_busy: float, seconds: float = 100) -> list[StageView]:
    """The default pipeline's shape: the store runs inside embed's calls, on one
    thread busy `store_busy` of the run."""
    shown = views(embed_full=0.91, embed_busy=1.0, seconds=seconds)[:3]
    embed = shown[2]
    store = StageView("store", "fused", 1, done=850, host="embed",
                      busy_seconds=store_busy * seconds)  # fmt: skip
    embed.fused_views = (store,)
    return shown


def test_a_fused_store_busy_all_the_run_is_named_as_the_limit() -> None:
    said = hints(fused_into_embed(store_busy=0.95), seconds=100)
    assert len(said) == 1 and said[0].startswith("store: it runs inside the calls of embed")
    assert "1 thread(s) were busy 95% of the run" in said[0]
    assert "stages.store.pool.size" in said[0]
    # A server that set embed's limit is not blamed for the store's time either.
    slow = fused_into_embed(store_busy=0.95)
    slow[2].limit_stats = limited(mean=2.0, final=2)
    assert hints(slow, seconds=100)[0].startswith("store: it runs inside the calls of embed")
    # A store with time to spare leaves the usual hint.
    assert hints(fused_into_embed(store_busy=0.3), seconds=100)[0].startswith(
        "embed: queue full 91%"
    )


def test_the_report_and_live_view_show_a_fused_stage_under_its_own_name() -> None:
    shown = fused_into_embed(store_busy=0.3, seconds=10)
    report = build_report(RunOutcome(seconds=10.0), shown)
    names = [(s["name"], s["fused_into"]) for s in report["stages"]]
    assert names == [("extract", None), ("chunk", None), ("embed", None), ("store", "embed")]
    assert report["stages"][2]["fused"] == ["store"]
    store = report["stages"][3]
    assert store["items_done"] == 850 and store["busy_seconds"] == 3.0
    assert store["utilisation"] == 0.3 and store["queue_full_share"] is None
    console = Console(record=True, width=140, color_system=None)
    console.print(render_frame(RunOutcome(), shown, elapsed=10.0))
    row = next(line for line in console.export_text().splitlines() if "└ store" in line)
    assert "in embed" in row and "850" in row
