"""The engine with toy stages: accounting, failures, retries, backpressure, resume."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.outcome import RunOutcome
from pipeline.runner import Runner
from pipeline.state import RunState, open_state
from tests.engine_stages import FLAKY_LEFT, GATES, SINKS, write_config, write_corpus

LINES_SINK = """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 2}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: %s}}
"""


async def no_sleep(seconds: float) -> None:
    del seconds


async def run_once(config: Path, *, runner_hook: object = None) -> tuple[Runner, RunOutcome]:
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=True)
    try:
        runner = Runner(cfg, state=state, sleep=no_sleep)
        outcome = await asyncio.wait_for(runner.run(), timeout=60)
        return runner, outcome
    finally:
        state.close()


def statuses(config: Path) -> dict[str, str]:
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=False)
    try:
        rows = state._db.execute("SELECT path, status FROM documents").fetchall()
        return dict(rows)
    finally:
        state.close()


def gated(tmp_path: Path, gate: str, *, embed_queue: int) -> Path:
    """lines -> a Gate stage of 2 async workers held shut by GATES[gate] -> sink."""
    GATES[gate] = asyncio.Event()
    return write_config(
        tmp_path,
        f"""
  - {{name: lines, uses: "tests.engine_stages:Lines", pool: {{kind: thread, size: 1}}, queue: 2}}
  - {{name: embed, uses: "tests.engine_stages:Gate", pool: {{kind: async, size: 2}},
     queue: {embed_queue}, with: {{gate: {gate}}}}}
  - {{name: sink, uses: "tests.engine_stages:Sink", with: {{name: {gate}}}}}
""",
    )


def start(config: Path) -> tuple[Runner, RunState, asyncio.Task[RunOutcome]]:
    """A run in the background, for tests that watch or stop it mid-way."""
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=True)
    runner = Runner(cfg, state=state, sleep=no_sleep)
    return runner, state, asyncio.create_task(runner.run())


async def test_every_document_ends_indexed_with_its_items(tmp_path: Path) -> None:
    docs = {f"d{i:02}.txt": "\n".join(f"line {i}.{j}" for j in range(i % 4 + 1)) for i in range(20)}
    write_corpus(tmp_path / "docs", docs)
    config = write_config(tmp_path, LINES_SINK % "every")
    _, outcome = await run_once(config)
    assert outcome.indexed == 20 and outcome.failed == 0 and outcome.exit_code == 0
    assert outcome.chunks == sum(i % 4 + 1 for i in range(20))
    assert set(statuses(config).values()) == {"indexed"}
    assert SINKS["every"]["d03.txt"] == ["line 3.0", "line 3.1", "line 3.2", "line 3.3"]


async def test_a_bad_document_fails_alone_with_its_reason(tmp_path: Path) -> None:
    write_corpus(
        tmp_path / "docs",
        {"good1.txt": "a\nb", "refused.txt": "PERMANENT", "buggy.txt": "BUG", "good2.txt": "c"},
    )
    config = write_config(tmp_path, LINES_SINK % "bad")
    _, outcome = await run_once(config)
    assert (outcome.indexed, outcome.failed, outcome.exit_code) == (2, 2, 1)
    assert outcome.failure_reasons == {"lines: toy_refused": 1, "lines: bug": 1}
    assert statuses(config) == {
        "good1.txt": "indexed",
        "good2.txt": "indexed",
        "refused.txt": "failed",
        "buggy.txt": "failed",
    }


async def test_a_rejected_batch_is_split_so_only_the_poisoned_document_fails(
    tmp_path: Path,
) -> None:
    docs = {f"d{i}.txt": "\n".join(f"text {i}.{j}" for j in range(3)) for i in range(12)}
    docs["d5.txt"] = "fine\nPOISON\nfine too"
    write_corpus(tmp_path / "docs", docs)
    GATES["split"] = asyncio.Event()
    GATES["split"].set()
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 1}}
  - {name: embed, uses: "tests.engine_stages:Gate", pool: {kind: async, size: 1},
     queue: 16, with: {gate: split, batch: 8}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: split}}
""",
    )
    _, outcome = await run_once(config)
    assert outcome.failed == 1 and outcome.indexed == 11
    assert outcome.failure_reasons == {"embed: http_400": 1}
    assert "d5.txt" not in SINKS["split"]  # nothing of a failed document stays stored
    assert len(SINKS["split"]) == 11


async def test_transient_errors_are_retried_until_they_pass(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "one", "b.txt": "two"})
    FLAKY_LEFT["retried"] = 3
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 1}}
  - {name: embed, uses: "tests.engine_stages:Flaky", pool: {kind: async, size: 1},
     retry: {attempts: 5}, with: {key: retried}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: retried}}
""",
    )
    runner, outcome = await run_once(config)
    assert outcome.indexed == 2 and outcome.failed == 0
    retries = runner.metrics.registry.get_sample_value(
        "pipeline_retries_total", {"stage": "embed", "reason": "http_503"}
    )
    assert retries == 3


async def test_transient_errors_past_the_attempt_limit_fail_the_documents(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "one"})
    FLAKY_LEFT["exhausted"] = 100
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 1}}
  - {name: embed, uses: "tests.engine_stages:Flaky", pool: {kind: async, size: 1},
     retry: {attempts: 2}, with: {key: exhausted}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: exhausted}}
""",
    )
    _, outcome = await run_once(config)
    assert outcome.failed == 1
    assert FLAKY_LEFT["exhausted"] == 98  # tried exactly twice
    assert "gave up after 2 attempts" in outcome.failure_examples["embed: http_503"][0]


async def test_crashing_and_hanging_workers_fail_only_their_documents(tmp_path: Path) -> None:
    docs = {f"ok{i}.txt": f"fine {i}" for i in range(6)}
    docs["crash.txt"] = "CRASH"
    docs["hang.txt"] = "HANG"
    write_corpus(tmp_path / "docs", docs)
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: process, size: 2},
     timeout_s: 2}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: crash}}
""",
    )
    _, outcome = await run_once(config)
    assert outcome.indexed == 6 and outcome.failed == 2
    examples = {k: v[0] for k, v in outcome.failure_examples.items()}
    assert examples["lines: worker_died"] == "crash.txt: worker died: exit code 7"
    assert examples["lines: timeout"] == "hang.txt: timed out after 2 s"


async def test_a_worker_over_its_memory_cap_fails_only_its_document(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {"big.txt": "BALLOON", "small.txt": "fine"})
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: process, size: 1},
     memory_mb: 512}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: balloon}}
""",
    )
    _, outcome = await run_once(config)
    assert (outcome.indexed, outcome.failed) == (1, 1)
    assert outcome.failure_reasons == {"lines: out_of_memory": 1}


async def test_a_stalled_stage_stops_the_source_at_the_channel_bound(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {f"d{i:03}.txt": f"text {i}" for i in range(200)})
    runner, state, task = start(gated(tmp_path, "stall", embed_queue=3))

    def saturated(r: Runner) -> bool:
        views = {v.name: v for v in r.views()}
        if len(views) < 3:
            return False
        lines_in = r._stages[0].inbox.statistics()
        embed_in = r._stages[1].inbox.statistics()
        return (
            views["embed"].busy == 2
            and embed_in.depth == 3
            and embed_in.waiting_senders == 1  # the lines worker, holding one item
            and lines_in.depth == 2
            and lines_in.waiting_senders == 1  # the source, holding the next document
        )

    async with asyncio.timeout(30):
        await runner.wait_until(saturated)
    handed = runner.metrics.registry.get_sample_value("pipeline_source_documents_total")
    # 2 queued for lines + 1 held by lines + 3 queued for embed + 2 in embed's workers.
    assert handed == 8
    assert runner.metrics.registry.get_sample_value(
        "pipeline_queue_depth", {"stage": "embed"}
    ) == runner.metrics.registry.get_sample_value("pipeline_queue_capacity", {"stage": "embed"})
    for _ in range(100):
        await asyncio.sleep(0)  # let every runnable task run: nothing more may enter
    assert runner.metrics.registry.get_sample_value("pipeline_source_documents_total") == 8
    GATES["stall"].set()
    async with asyncio.timeout(60):
        outcome = await task
    state.close()
    assert outcome.indexed == 200


async def test_stop_drains_in_flight_work_and_the_next_run_resumes(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {f"d{i:02}.txt": f"text {i}" for i in range(30)})
    config = gated(tmp_path, "resume", embed_queue=2)
    runner, state, task = start(config)
    async with asyncio.timeout(30):
        await runner.wait_until(lambda r: bool(r._stages) and r._stages[1].view.busy == 2)
    runner.stop(signal_name="SIGTERM")
    GATES["resume"].set()
    async with asyncio.timeout(30):
        first = await task
    state.close()
    assert first.stopped_by == "SIGTERM" and first.exit_code == 143
    assert first.indexed >= 2 and first.indexed < 30
    assert first.indexed + first.interrupted == first.discovered

    _, second = await run_once(config)
    assert second.exit_code == 0
    assert second.unchanged == first.indexed
    assert second.indexed == 30 - first.indexed
    assert sorted(SINKS["resume"]) == sorted(f"d{i:02}.txt" for i in range(30))
    assert all(len(texts) == 1 for texts in SINKS["resume"].values())  # none processed twice


async def test_incremental_run_updates_changed_and_removes_deleted_documents(
    tmp_path: Path,
) -> None:
    docs = write_corpus(tmp_path / "docs", {"keep.txt": "same", "edit.txt": "old", "gone.txt": "x"})
    config = write_config(tmp_path, LINES_SINK % "incremental")
    _, first = await run_once(config)
    assert first.added == 3

    _, unchanged = await run_once(config)
    assert (unchanged.unchanged, unchanged.indexed) == (3, 0)

    (docs / "edit.txt").write_text("new\nlines")
    (docs / "gone.txt").unlink()
    _, second = await run_once(config)
    assert (second.updated, second.unchanged, second.removed) == (1, 1, 1)
    assert SINKS["incremental"]["edit.txt"] == ["new", "lines"]
    assert "gone.txt" not in SINKS["incremental"]
    assert statuses(config) == {"keep.txt": "indexed", "edit.txt": "indexed"}


async def test_byte_identical_documents_are_indexed_once(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "same words", "b.txt": "same words"})
    config = write_config(tmp_path, LINES_SINK % "dups")
    _, outcome = await run_once(config)
    assert (outcome.indexed, outcome.duplicates) == (1, 1)
    assert list(SINKS["dups"]) == ["a.txt"]


def test_a_second_run_on_the_same_state_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import FatalError

    first = open_state(tmp_path / "state.db", exclusive=True)
    try:
        with pytest.raises(FatalError, match="in use by another run"):
            open_state(tmp_path / "state.db", exclusive=True)
    finally:
        first.close()


def test_the_engine_imports_no_stage_libraries() -> None:
    code = (
        "import sys, pipeline.runner, pipeline.cli\n"
        "bad = [m for m in ('pypdf', 'qdrant_client', 'qdrant_edge', 'httpx', 'stages')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_document_that_stops_being_indexable_loses_its_points(tmp_path: Path) -> None:
    import os

    docs = write_corpus(
        tmp_path / "docs", {"a.txt": "alpha", "b.txt": "beta", "c.txt": "gamma", "d.txt": "delta"}
    )
    config = write_config(tmp_path, LINES_SINK % "unindexable")
    await run_once(config)
    (docs / "b.txt").write_text("alpha")  # now a byte-identical copy of a.txt
    (docs / "c.txt").unlink()
    os.mkfifo(docs / "c.txt")  # now not a regular file
    (docs / "d.txt").rename(docs / "renamed.txt")  # renamed: the copy is indexed at once
    _, outcome = await run_once(config)
    assert sorted(SINKS["unindexable"]) == ["a.txt", "renamed.txt"]
    assert outcome.removed == 1 and outcome.added == 1
    assert statuses(config) == {
        "a.txt": "indexed",
        "b.txt": "skipped",
        "c.txt": "skipped",
        "renamed.txt": "indexed",
    }


async def test_a_folder_that_cannot_be_read_is_not_taken_for_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    docs = write_corpus(tmp_path / "docs", {"top.txt": "one", "sub/inner.txt": "two"})
    config = write_config(tmp_path, LINES_SINK % "unreadable")
    await run_once(config)
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if str(path) == str(docs / "sub"):  # root reads everything: fake the EACCES
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr("pipeline.source.os.scandir", scandir)
    _, outcome = await run_once(config)
    assert (outcome.removed, outcome.walk_errors, outcome.unchanged) == (0, 1, 1)
    assert "sub/inner.txt" in SINKS["unreadable"]
    assert statuses(config)["sub/inner.txt"] == "indexed"


async def test_an_async_stage_past_its_timeout_fails_the_document(tmp_path: Path) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "waits forever"})
    GATES["deadline"] = asyncio.Event()  # never opened
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 1}}
  - {name: embed, uses: "tests.engine_stages:Gate", pool: {kind: async, size: 1},
     timeout_s: 0.2, with: {gate: deadline}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: deadline}}
""",
    )
    _, outcome = await run_once(config)
    assert outcome.failure_examples == {"embed: timeout": ["a.txt: timed out after 0.2 s"]}


async def test_a_touched_but_unchanged_file_is_not_hashed_again(tmp_path: Path) -> None:
    import os

    docs = write_corpus(tmp_path / "docs", {"a.txt": "same"})
    config = write_config(tmp_path, LINES_SINK % "touched")
    await run_once(config)
    os.utime(docs / "a.txt", ns=(1_000_000_000, 1_000_000_000))
    _, outcome = await run_once(config)
    assert outcome.unchanged == 1
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=False)
    try:
        record = state.get("a.txt")
    finally:
        state.close()
    assert record is not None and record.mtime_ns == 1_000_000_000


async def test_a_document_the_store_refuses_in_the_embedders_process_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "one\ntwo", "b.txt": "REJECT"})
    config = write_config(
        tmp_path,
        f"""
  - {{name: lines, uses: "tests.engine_stages:Lines", pool: {{kind: process, size: 1}}}}
  - name: embed
    uses: "tests.engine_stages:Flaky"
    pool: {{kind: async, size: 2, own_process: true}}
  - {{name: store, uses: "tests.engine_stages:FileSink", with: {{log: {tmp_path / "log"}}}}}
""",
    )
    assert [f.name for f in load_config(config).stages[-1].fused] == ["store"]
    runner, outcome = await run_once(config)
    assert dict(outcome.failure_reasons) == {"store: refused": 1}  # the store's, not embed's
    # Counted under its own name, as a store of its own pool would be.
    [store] = runner.views()[-1].fused_views
    assert (store.name, store.host, store.done, store.failed) == ("store", "embed", 2, 1)
    assert store.busy_seconds > 0 and len(store.durations) >= 1
    sample = runner.metrics.registry.get_sample_value
    assert sample("pipeline_items_total", {"stage": "store", "outcome": "ok"}) == 2
    assert sample("pipeline_items_total", {"stage": "store", "outcome": "failed"}) == 1
    assert sample("pipeline_stage_busy_seconds_total", {"stage": "store"}) == store.busy_seconds
    assert statuses(config) == {"a.txt": "indexed", "b.txt": "failed"}
    # Nothing of b counted as stored, but a store that failed may have written part
    # of a call: as for any last stage, it is told to drop all of b.
    assert "discarded b.txt" in (tmp_path / "log").read_text().splitlines()


async def test_a_fused_stage_runs_in_the_workers_of_the_one_before_and_fails_under_its_own_name(
    tmp_path: Path,
) -> None:
    write_corpus(tmp_path / "docs", {"a.txt": "one\ntwo", "b.txt": "REFUSE\nthree", "c.txt": "x"})
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: process, size: 2}}
  - {name: tag, uses: "tests.engine_stages:Tag"}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: fused}}
""",
    )
    cfg = load_config(config)
    assert [s.name for s in cfg.stages] == ["lines", "sink"]
    assert [f.name for f in cfg.stages[0].fused] == ["tag"]
    runner, outcome = await run_once(config)
    assert SINKS["fused"] == {"a.txt": ["one [tagged]", "two [tagged]"], "c.txt": ["x [tagged]"]}
    assert dict(outcome.failure_reasons) == {"tag: toy_tag_refused": 1}
    assert statuses(config) == {"a.txt": "indexed", "b.txt": "failed", "c.txt": "indexed"}
    [tag] = runner.views()[0].fused_views
    assert (tag.name, tag.host, tag.workers, tag.done, tag.failed) == ("tag", "lines", 2, 3, 1)
