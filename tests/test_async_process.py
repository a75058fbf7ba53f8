"""An async pool whose event loop runs in a child process (`own_process: true`):
calls come back as in-process, with their counters and notes; a child that dies
fails only its calls in flight and is replaced; a timeout cancels the call in the
child; the child ends with the pool, or when the engine's process is gone."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipeline.errors import FatalError, InUseError, PermanentError, TransientError
from pipeline.pools import Pool, StageSpec, open_pool
from pipeline.stage import AsyncStage, Item, Stage
from pipeline.vector_space import ModelRecord
from stages.embed_server import EmbeddingServer
from tests.fault_server import FaultServer
from tests.processes import alive, descendants, name
from tests.stores import collection


class Marked(AsyncStage):
    """Tags items with the child's pid; misbehaves on the marks in an item's doc."""

    COUNTERS: ClassVar[Mapping[str, tuple[str, str]]] = {"calls": ("how", "how it ended")}

    async def open(self) -> None:
        if self.params.get("refuse"):
            raise FatalError("cannot open: refused on purpose")
        if self.params.get("die"):
            os._exit(5)

    async def process(self, items: list[Item]) -> list[Item]:
        docs = {item.doc for item in items}
        if "die" in docs:
            os._exit(3)
        if "busy" in docs:
            self.increment("calls", "busy")
            raise TransientError("busy", reason="http_503", unavailable=True)
        if "hang" in docs:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.increment("calls", "cancelled")
                raise
        self.increment("calls", "ok")
        return [Item(item.doc, {**item.data, "pid": os.getpid()}) for item in items]

    def notes(self) -> list[str]:
        return [f"{self.counts[('calls', 'ok')]} calls went well"]


class Kept(Stage):
    """A blocking stage fused after Marked (a store, say): it runs in Marked's child,
    on threads of its own; misbehaves on the marks in an item's doc. With `lock`, it
    holds that file's lock while open, as the Edge store holds its WAL's, and notes
    in `log` each time it finds the lock taken."""

    def open(self) -> None:
        if self.params.get("refuse"):
            raise FatalError("the store cannot open")
        if "lock" in self.params:
            self._fd = os.open(self.params["lock"], os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with open(self.params["log"], "a") as log:
                    log.write("in use\n")
                raise InUseError("store in use by another run") from None

    def process(self, items: list[Item]) -> list[Item]:
        docs = {item.doc for item in items}
        if "reject" in docs:
            raise PermanentError("the store rejected it", reason="rejected")
        if "bug" in docs:
            raise KeyError("vector")
        if "wrong" in docs:
            raise FatalError("vectors of another model")
        where = (os.getpid(), threading.current_thread().name)
        return [Item(item.doc, {**item.data, "kept_by": where}) for item in items]

    def discard(self, docs: Sequence[str]) -> None:
        with open(self.params["log"], "a") as log:
            log.writelines(f"{doc}\n" for doc in docs)

    def recorded_model(self) -> str | None:
        if self.params.get("unsure"):
            raise TransientError("the store timed out", reason="timeout")
        return "model-x"


def pool(
    timeout_s: float | None = None,
    *,
    fused: Sequence[StageSpec] = (),
    sink: bool = False,
    **params: Any,
) -> Pool:
    return open_pool(
        Marked,
        uses=f"{Marked.__module__}:Marked",
        name="marked",
        kind="async",
        size=4,
        params=params,
        timeout_s=timeout_s,
        memory_mb=None,
        fused=fused,
        own_process=True,
        sink=sink,
    )


def lines_in(log: Path, line: str, count: int, *, timeout: float = 30.0) -> None:
    """Block until `log` holds `count` copies of `line` (a child writes them)."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(line) < count:
        assert time.monotonic() < deadline, f"{log} never held {count} x {line!r}"
        time.sleep(0.02)


def kept(log: Path, **params: Any) -> StageSpec:
    return StageSpec(f"{Kept.__module__}:Kept", "kept", {"log": str(log), **params}, 2)


async def test_calls_run_in_the_child_and_come_back_with_counts_and_notes() -> None:
    p = pool()
    await p.open()
    try:
        outs = await asyncio.gather(*(p.run([Item(f"d{n}", {"n": n})]) for n in range(8)))
        with pytest.raises(TransientError) as busy:
            await p.run([Item("busy", {})])
    finally:
        await p.close()
    assert [o[0].data["n"] for o in outs] == list(range(8))
    assert {o[0].data["pid"] for o in outs} != {os.getpid()}  # ran elsewhere, in one child
    assert len({o[0].data["pid"] for o in outs}) == 1
    assert busy.value.unavailable and busy.value.reason == "http_503"  # the error as raised
    assert p.stage.counts == {("calls", "ok"): 8, ("calls", "busy"): 1}
    assert p.notes() == ["8 calls went well"]  # the child's, as of its last reply


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_child_is_named_after_its_stage_for_top_and_ps() -> None:
    p = pool()
    await p.open()
    try:
        (out,) = await p.run([Item("a", {})])
        assert name(out.data["pid"]) == "marked"
    finally:
        await p.close()


async def test_a_dying_child_fails_its_calls_and_the_next_call_gets_a_new_one() -> None:
    p = pool()
    await p.open()
    try:
        before = (await p.run([Item("a", {})]))[0].data["pid"]
        with pytest.raises(PermanentError) as died:
            await p.run([Item("die", {})])
        after = (await p.run([Item("b", {})]))[0].data["pid"]
    finally:
        await p.close()
    assert died.value.reason == "worker_died" and "exit code 3" in str(died.value)
    assert after != before


async def test_a_timeout_cancels_the_call_in_the_child() -> None:
    p = pool(timeout_s=0.5)
    await p.open()
    try:
        with pytest.raises(PermanentError) as late:
            await p.run([Item("hang", {})])
        await p.run([Item("a", {})])  # its reply carries the count of the cancelled call
    finally:
        await p.close()
    assert late.value.reason == "timeout"
    assert p.stage.counts[("calls", "cancelled")] == 1


async def test_a_stage_that_cannot_open_fails_open_with_its_error() -> None:
    p = pool(refuse=True)
    with pytest.raises(FatalError, match="refused on purpose"):
        await p.open()
    await p.close()


async def test_a_child_that_dies_while_opening_the_stage_stops_the_run() -> None:
    p = pool(die=True)
    with pytest.raises(FatalError, match="did not start.*exit code 5"):
        await p.open()
    await p.close()


async def test_close_ends_the_child() -> None:
    p = pool()
    await p.open()
    pid = (await p.run([Item("a", {})]))[0].data["pid"]
    await p.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_fused_stage_runs_in_the_child_on_threads_of_its_own(tmp_path: Path) -> None:
    p = pool(fused=[kept(tmp_path / "log")])
    await p.open()
    try:
        [out] = await p.run([Item("a", {"n": 1})])
        await p.discard(["a", "b"])
        copies = p.copies()
    finally:
        await p.close()
    pid, thread = out.data["kept_by"]
    assert pid == out.data["pid"] != os.getpid()  # after the host, in its child
    assert thread.startswith("kept") and out.data["n"] == 1
    assert (tmp_path / "log").read_text().split() == ["a", "b"]  # discard reached it
    # what the child's copy said of its collection, for the engine's model check
    assert copies["marked"] is p.stage
    assert isinstance(copies["kept"], ModelRecord)
    assert copies["kept"].recorded_model() == "model-x"


async def test_a_fused_stage_fails_under_its_own_name(tmp_path: Path) -> None:
    p = pool(fused=[kept(tmp_path / "log")])
    await p.open()
    try:
        with pytest.raises(PermanentError) as rejected:
            await p.run([Item("reject", {})])
        with pytest.raises(PermanentError) as bug:
            await p.run([Item("bug", {})])
        with pytest.raises(FatalError, match="another model"):
            await p.run([Item("wrong", {})])
    finally:
        await p.close()
    assert (rejected.value.stage, rejected.value.reason) == ("kept", "rejected")
    assert (bug.value.stage, bug.value.reason) == ("kept", "bug")


async def test_a_fused_stage_that_cannot_open_fails_open(tmp_path: Path) -> None:
    p = pool(fused=[kept(tmp_path / "log", refuse=True)])
    with pytest.raises(FatalError, match="cannot open"):
        await p.open()
    await p.close()


async def test_a_store_that_cannot_say_its_model_says_so_where_the_engine_checks(
    tmp_path: Path,
) -> None:
    p = pool(fused=[kept(tmp_path / "log", unsure=True)])
    await p.open()  # the engine turns this into "cannot read which model built..."
    await p.close()
    with pytest.raises(TransientError, match="timed out"):
        p.copies()["kept"].recorded_model()  # type: ignore[attr-defined]


async def test_a_new_child_waits_for_the_store_the_last_one_held(tmp_path: Path) -> None:
    lock, log = tmp_path / "lock", tmp_path / "log"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another run holds the store
    p = pool(fused=[kept(log, lock=str(lock))])
    with pytest.raises(InUseError):
        await p.open()  # at open: said at once
    fcntl.flock(holder, fcntl.LOCK_UN)
    await p.open()
    try:
        with pytest.raises(PermanentError, match="died"):
            await p.run([Item("die", {})])
        # What the dead child held is not let go yet (the Edge process of a store
        # finishing a write): the next call's new child must wait for it.
        fcntl.flock(holder, fcntl.LOCK_EX)
        call = asyncio.create_task(p.run([Item("a", {})]))
        await asyncio.to_thread(lines_in, log, "in use", 2)  # the new child found it taken
        fcntl.flock(holder, fcntl.LOCK_UN)
        [out] = await call
    finally:
        await p.close()
        os.close(holder)
    assert out.data["kept_by"][0] == out.data["pid"]


async def test_the_last_stage_sends_back_which_items_got_through_not_their_fields(
    tmp_path: Path,
) -> None:
    p = pool(fused=[kept(tmp_path / "log")], sink=True)
    await p.open()
    try:
        out = await p.run([Item("a", {"text": "x" * 1000}), Item("b", {"text": "y"})])
    finally:
        await p.close()
    assert out == [Item("a"), Item("b")]


# -- the whole pipeline, as a user runs it ------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "pdfs"


def project(folder: Path, url: str, *, own_process: bool) -> Path:
    shutil.copytree(EXAMPLES, folder / "docs")
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}}}
  - {{name: chunk, uses: text.chunk, with: {{size: 600, overlap: 100}}}}
  - name: embed
    uses: openai.embed
    pool: {{kind: async, size: 8, own_process: {str(own_process).lower()}}}
    with: {{url: "{url}", model: hash-384, batch: 16}}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_run_with_its_own_embedding_process_stores_what_an_in_process_run_does(
    tmp_path: Path,
) -> None:
    with EmbeddingServer() as server:
        runs = {}
        for own in (False, True):
            config = project(tmp_path / str(own), server.url, own_process=own)
            report_file = tmp_path / f"report-{own}.json"
            done = run("run", "-c", str(config), "--no-progress", "--report", str(report_file))
            assert done.returncode == 0, done.stderr
            runs[own] = collection(tmp_path / str(own))
            report = json.loads(report_file.read_text())
            embed = next(s for s in report["stages"] if s["name"] == "embed")
            assert embed["counters"]  # the child's request counts reached the report
    assert runs[True] == runs[False] and runs[True]


def test_a_store_in_the_embedders_process_is_searched_optimized_and_checked(
    tmp_path: Path,
) -> None:
    with EmbeddingServer() as server:
        config = project(tmp_path, server.url, own_process=True)
        assert run("run", "-c", str(config), "--no-progress").returncode == 0
        found = run("search", "-c", str(config), "--json", "-k", "3", "the siege")
        optimized = run("optimize", "-c", str(config))
        requests = server.requests
        config.write_text(config.read_text().replace("hash-384", "all-MiniLM-L6-v2"))
        refused = run("run", "-c", str(config), "--no-progress")
        assert server.requests == requests  # refused before any call
    assert found.returncode == 0, found.stderr
    assert len(json.loads(found.stdout)) == 3
    assert optimized.returncode == 0, optimized.stderr
    assert "optimized the store of stage store" in optimized.stderr
    # Another model is a config error before any work, not a failed write (exit 3).
    assert refused.returncode == 2, refused.stderr
    said = " ".join(refused.stderr.split())
    assert "stages[2].with.model" in said and "'hash-384'" in said


def test_kill_9_of_the_engine_ends_its_embedding_and_store_processes(tmp_path: Path) -> None:
    with FaultServer() as server, EmbeddingServer() as good:
        config = project(tmp_path, server.url, own_process=True)
        server.hang()  # requests wait: the run is mid-flight, both children alive
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(config), "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert server.wait_for_requests(1, timeout=60)
        children = descendants(proc.pid)
        assert len(children) >= 3  # forkserver, workers, the embed and Edge children
        proc.kill()
        proc.wait(timeout=30)
        server.release()
        for pid in children:  # each child sees its pipe close and exits
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(pid), f"process {pid} outlived the engine"
        config.write_text(config.read_text().replace(server.url, good.url))
        rerun = run("run", "-c", str(config), "--no-progress")  # the store's lock was freed
        assert rerun.returncode == 0, rerun.stderr
