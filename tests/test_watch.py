"""`pipeline watch` as a user runs it: a real folder, real filesystem events, the builtin
embedding server, the command in a subprocess. The test follows the watcher's log lines
(each pass says what it did), never the clock."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stages.embed_server import EmbeddingServer
from tests.fault_server import FaultServer
from tests.test_end_to_end import collection, free_port, pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pdfs"
FIRST, SECOND, THIRD = "google-docs-export.pdf", "pdfa-crazyones.pdf", "udhr-multiscript.pdf"


class Watching:
    """`pipeline watch` in the background, its log lines readable as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "watch", "--no-progress", *args],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, *, timeout: float = 60) -> str:
        """The next log line containing `text` (earlier lines are kept in `log`)."""
        while True:
            line = self.lines.get(timeout=timeout)
            self.log.append(line)
            if text in line:
                return line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return code


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as running:
        yield running


def project(folder: Path, url: str, *, settle_s: float = 0.5) -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in (FIRST, SECOND):
        shutil.copy(EXAMPLES / name, docs / name)
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
watch: {{settle_s: {settle_s}, rescan_s: 600}}
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}}}
  - {{name: chunk, uses: text.chunk}}
  - {{name: embed, uses: openai.embed, with: {{url: "{url}", model: hash-384}}}}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


def status(config: Path) -> dict[str, int]:
    counts: dict[str, int] = json.loads(pipeline("status", "-c", str(config), "--json").stdout)[
        "documents"
    ]
    return counts


def test_the_index_follows_the_folder(tmp_path: Path, server: EmbeddingServer) -> None:
    config = project(tmp_path, server.url)
    docs = tmp_path / "docs"
    port = free_port()
    watch = Watching("-c", str(config), "--metrics-port", str(port))
    try:
        watch.wait_for(": 2 indexed")  # caught up, once the fresh copies settled
        assert status(config) == {"indexed": 2}  # read while the watcher holds the state

        shutil.copy(EXAMPLES / THIRD, docs / THIRD)  # a new file
        watch.wait_for(": 1 indexed")
        search = pipeline("search", "-c", str(config), "--json", "-k", "1", "human rights")
        assert search.returncode == 0, search.stderr  # the store is free between passes
        assert json.loads(search.stdout)[0]["path"] == THIRD

        (docs / FIRST).rename(docs / "renamed.pdf")  # a move
        (docs / SECOND).unlink()  # a removal
        removed = 0
        while removed < 2:  # the two changes may come in one pass or two
            found = re.search(r"(\d+) removed", watch.wait_for(" removed, "))
            assert found is not None
            removed += int(found[1])
        assert status(config) == {"indexed": 2}
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'pipeline_documents_total{status="indexed"} 4.0' in scrape  # every pass
    finally:
        code = watch.stop()
    assert code == 143, "".join(watch.log)
    shutil.copy(EXAMPLES / SECOND, docs / SECOND)  # changed while nothing watched
    again = pipeline("run", "-c", str(config), "--no-progress")
    assert again.returncode == 0 and "1 indexed" in again.stderr


def test_a_file_still_being_written_is_not_read_half_way(
    tmp_path: Path, server: EmbeddingServer
) -> None:
    config = project(tmp_path, server.url, settle_s=1.0)
    watch = Watching("-c", str(config))
    try:
        watch.wait_for(": 2 indexed")
        data = (EXAMPLES / THIRD).read_bytes()
        target = tmp_path / "docs" / THIRD
        with target.open("wb") as out:  # written in two halves, like a slow upload
            out.write(data[: len(data) // 2])
            out.flush()
            watch.wait_for(" 1 left to settle")  # a pass saw it mid-write and left it
            out.write(data[len(data) // 2 :])
        line = watch.wait_for(": 1 indexed")
    finally:
        code = watch.stop()
    assert code == 143
    assert "0 failed" in line and "failed " + THIRD not in "".join(watch.log)
    failed = json.loads(pipeline("failed", "-c", str(config), "--json").stdout)
    assert failed == []


def test_kill_9_of_a_watcher_mid_pass_loses_nothing(
    tmp_path: Path, server: EmbeddingServer
) -> None:
    clean = project(tmp_path / "clean", server.url)
    assert pipeline("run", "-c", str(clean), "--no-progress").returncode == 0
    with FaultServer() as hung:
        config = project(tmp_path / "killed", hung.url, settle_s=0)
        hung.hang()  # the pass is mid-flight, embedding requests held, when killed
        watch = Watching("-c", str(config))
        assert hung.wait_for_requests(1, timeout=60)
        watch.proc.kill()
        watch.proc.wait(timeout=30)
        hung.release()
    config.write_text(config.read_text().replace(hung.url, server.url))
    assert pipeline("run", "-c", str(config), "--no-progress").returncode == 0
    assert collection(tmp_path / "killed") == collection(tmp_path / "clean")


async def test_the_rescan_finds_what_events_missed(
    tmp_path: Path, server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events get lost (network filesystems, an overflowing inotify queue): with none at
    all, the periodic rescan still indexes a new file and prunes a removed one."""
    from pipeline.config import load_config
    from pipeline.metrics import Metrics
    from pipeline.state import open_state
    from pipeline.watch import Watcher

    async def no_events(self: Watcher) -> None:
        await asyncio.Event().wait()  # a feed that never reports anything

    monkeypatch.setattr(Watcher, "_events", no_events)
    config = project(tmp_path, server.url, settle_s=0)
    config.write_text(config.read_text().replace("rescan_s: 600", "rescan_s: 0.2"))
    cfg = load_config(config)
    state = open_state(cfg.state, exclusive=True)
    watcher = Watcher(cfg, state=state, metrics=Metrics())
    task = asyncio.create_task(watcher.run(live=False))
    try:
        async with asyncio.timeout(60):
            while state.counts() != {"indexed": 2}:  # the catch-up, once the copies settled
                watcher.passed.clear()
                await watcher.passed.wait()
            caught_up = watcher.passes
            docs = tmp_path / "docs"
            shutil.copy(EXAMPLES / THIRD, docs / THIRD)
            (docs / FIRST).unlink()
            while state.get(THIRD) is None or state.get(FIRST) is not None:
                watcher.passed.clear()
                await watcher.passed.wait()
        assert watcher.passes > caught_up and state.counts() == {"indexed": 2}
    finally:
        watcher.stop("SIGTERM")
        assert await asyncio.wait_for(task, 60) == 143
        state.close()
