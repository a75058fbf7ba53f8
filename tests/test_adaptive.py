"""The embed pool against servers that behave like real ones: a CPU model server that
computes one request at a time and queues the rest, a server that scales, one that goes
away and comes back, one that is not there, and one that refuses a setting.

Real parts throughout: generated PDFs, the process pool, the `openai.embed` stage over
HTTP on 127.0.0.1, Qdrant Edge. The runner runs in this process so the test can watch it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.corpus import generate
from pipeline.config import load_config
from pipeline.outcome import RunOutcome
from pipeline.report import build_report
from pipeline.runner import Runner
from pipeline.state import open_state
from stages.embed_server import EmbeddingServer
from tests.capacity_server import CapacityServer
from tests.fault_server import FaultServer

DOCS = 100  # about 840 chunks of 1,200 characters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    generate(folder, docs=DOCS, pages=3)
    return folder


def project(
    folder: Path,
    docs: Path,
    url: str,
    *,
    embed: str = "",
    retry: str = "",
    workers: int = 64,
    batch: int = 64,
) -> Path:
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: "{docs}"}}
state: state/state.db
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}}}
  - {{name: chunk, uses: text.chunk, with: {{size: 1200, overlap: 200}}}}
  - name: embed
    uses: openai.embed
    pool: {{kind: async, size: {workers}}}
    retry: {{attempts: 6, base_s: 0.05, cap_s: 0.5{retry}}}
    with: {{url: "{url}", model: hash-384, batch: {batch}{embed}}}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


async def run(config: Path, *, during: object = None) -> tuple[Runner, RunOutcome]:
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=True)
    try:
        runner = Runner(cfg, state=state)
        task = asyncio.create_task(runner.run())
        if during is not None:
            await during(runner)  # type: ignore[operator]
        return runner, await asyncio.wait_for(task, timeout=120)
    finally:
        state.close()


def statuses(config: Path) -> dict[str, int]:
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=False)
    try:
        return state.counts()
    finally:
        state.close()


@pytest.fixture
def one_at_a_time() -> Iterator[CapacityServer]:
    with CapacityServer(slots=1, per_text_s=0.005, max_input_tokens=128) as server:
        yield server


async def test_a_server_that_computes_one_request_at_a_time_is_not_flooded(
    tmp_path: Path, corpus: Path, one_at_a_time: CapacityServer
) -> None:
    # 64 requests at once would queue ~13 x 0.3 s at this server, past the 3 s timeout,
    # and every resend would queue behind the abandoned copies (what main did).
    config = project(tmp_path, corpus, one_at_a_time.url, embed=", request_timeout_s: 3")
    runner, outcome = await run(config)
    assert outcome.exit_code == 0 and outcome.indexed == DOCS
    server = one_at_a_time
    assert server.abandoned <= 0.02 * server.requests
    assert server.texts_computed <= 1.02 * outcome.chunks  # nothing computed twice
    report = build_report(outcome, runner.views())
    embed = next(s for s in report["stages"] if s["name"] == "embed")
    limit = embed["concurrency"]
    assert limit["ceiling"] == 64 and limit["highest"] < 64 and limit["lowest"] <= 3
    assert limit["trace"][0] == [0.0, limit["initial"]] and len(limit["trace"]) > 1
    assert not any("raise stages.embed.pool.size" in hint for hint in report["hints"])
    # The window the server reports (128 tokens) is shorter than the chunks: said once.
    assert len(outcome.notes) == 1 and "input window of 128 tokens" in outcome.notes[0]


async def test_a_server_that_scales_lets_the_limit_climb_to_the_ceiling(
    tmp_path: Path, corpus: Path
) -> None:
    with EmbeddingServer(latency_s=0.1) as server:
        config = project(tmp_path, corpus, server.url, workers=16, batch=4)
        runner, outcome = await run(config)
    assert outcome.exit_code == 0
    embed = next(v for v in runner.views() if v.name == "embed")
    assert embed.limit_stats is not None and embed.limit_stats.highest == 16
    assert outcome.notes == []  # the hash model has no window to exceed


async def test_a_server_down_for_a_while_mid_run_costs_no_document(
    tmp_path: Path, corpus: Path
) -> None:
    with CapacityServer(slots=4, per_text_s=0.001) as server:
        config = project(tmp_path, corpus, server.url, retry=", max_wait_s: 60")

        async def outage(runner: Runner) -> None:
            await asyncio.to_thread(server.wait_for_requests, 3, timeout=30)
            server.stop_listening()
            breaker = next(st for st in runner._stages if st.cfg.name == "embed").retry.breaker
            # Down past what the documents' own retries would have lasted (6 attempts,
            # at most 1.25 s of backoff): five probes, 1.7 s at least, find it gone.
            await asyncio.wait_for(runner.wait_until(lambda _: breaker.probes >= 5), timeout=30)
            [embed] = [view for view in runner.views() if view.name == "embed"]
            assert embed.unavailable_s >= 1.25
            server.start_listening()

        _runner, outcome = await run(config, during=outage)
    assert outcome.exit_code == 0 and outcome.indexed == DOCS and outcome.failed == 0
    assert any(reason.startswith("embed: connection") for reason in outcome.retry_reasons)


async def test_an_api_that_is_not_there_stops_the_run_with_documents_left_pending(
    tmp_path: Path, corpus: Path
) -> None:
    with EmbeddingServer() as server:
        url = server.url  # a port that was just free, and is closed again below
    config = project(tmp_path, corpus, url, retry=", max_wait_s: 1")
    began = time.monotonic()
    _runner, outcome = await run(config)
    assert outcome.exit_code == 3
    assert outcome.fatal is not None and "did not come back within 1 s" in outcome.fatal
    assert "Connect" in outcome.fatal  # the reason: connection refused
    assert time.monotonic() - began < 60
    counts = statuses(config)
    assert counts.get("failed", 0) == 0 and counts.get("pending", 0) > 0


async def test_a_setting_the_server_refuses_for_every_request_stops_the_run(
    tmp_path: Path, corpus: Path
) -> None:
    with EmbeddingServer() as server:
        config = project(tmp_path, corpus, server.url, embed=", dimensions: 1024")
        _runner, outcome = await run(config)
        requests = server.requests
    assert outcome.exit_code == 3
    assert (
        outcome.fatal is not None and "'dimensions' must be an integer in 1..384" in outcome.fatal
    )
    assert statuses(config).get("failed", 0) == 0  # nothing dead-lettered: pending
    assert requests < 40  # not every chunk split down alone (main sent one per chunk)


async def test_one_refused_chunk_among_good_ones_fails_only_its_document(
    tmp_path: Path, corpus: Path
) -> None:
    with FaultServer() as server:
        server.reject_input("doc-00007 ")  # the page footer of one document
        config = project(tmp_path, corpus, server.url)
        _runner, outcome = await run(config)
    assert outcome.exit_code == 1 and outcome.indexed == DOCS - 1
    assert dict(outcome.failure_reasons) == {"embed: http_400": 1}
    assert outcome.failure_examples["embed: http_400"][0].startswith("doc-00007.pdf: ")
