"""The process pool: a task that hangs or kills its worker fails alone, and the task
queued behind it in the same worker runs on another; a timeout counts from when the
worker starts the task, not from the building of its stages; a task the worker
cannot read fails alone; a stage that cannot open fails each task with its reason;
closing ends the calls in flight; a task too big for the pipe waits for an idle
worker instead of blocking the loop."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import pytest

from pipeline.errors import PermanentError
from pipeline.pools import Pool, open_pool
from pipeline.stage import Item, Stage
from tests.processes import name


class Work(Stage):
    """Does what an item's "do" says: crash, hang, take "seconds", or echo its pid."""

    POOLS = ("process", "thread")

    def open(self) -> None:
        if self.params.get("refuse"):
            raise PermanentError("cannot open: refused on purpose", reason="toy_open")
        time.sleep(self.params.get("open_s", 0))  # loading a model, say: its own work

    def process(self, items: list[Item]) -> list[Item]:
        for item in items:
            what = item.data.get("do")
            if what == "crash":
                os._exit(9)
            if what == "hang":
                time.sleep(3600)
            if what == "work":
                time.sleep(item.data["seconds"])  # the task's own work, not a wait on a test
        return [Item(item.doc, {"pid": os.getpid()}) for item in items]


def _explode() -> None:
    raise ValueError("cannot be rebuilt here")


class Unloadable:
    """Pickles in the engine, fails to unpickle in the worker."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_explode, ())


def pool(*, size: int = 1, timeout_s: float | None = None, **params: Any) -> Pool:
    return open_pool(
        Work,
        uses=f"{Work.__module__}:Work",
        name="work",
        kind="process",
        size=size,
        params=params,
        timeout_s=timeout_s,
        memory_mb=None,
    )


def task(doc: str, **data: Any) -> list[Item]:
    return [Item(doc, data)]


async def test_a_hung_task_fails_alone_and_the_one_queued_behind_it_runs_elsewhere() -> None:
    p = pool(timeout_s=1.5)
    await p.open()
    try:
        first = await p.run(task("warm"))
        hung, after = await asyncio.gather(
            p.run(task("hang", do="hang")), p.run(task("after")), return_exceptions=True
        )
        assert isinstance(hung, PermanentError) and hung.reason == "timeout"
        assert str(hung) == "timed out after 1.5 s"
        assert isinstance(after, list)  # it waited in the hung worker's pipe
        assert after[0].data["pid"] != first[0].data["pid"]  # a new worker ran it
    finally:
        await p.close()


async def test_a_crash_fails_only_its_task_with_the_exit_code() -> None:
    p = pool()
    await p.open()
    try:
        crashed, after = await asyncio.gather(
            p.run(task("crash", do="crash")), p.run(task("after")), return_exceptions=True
        )
        assert isinstance(crashed, PermanentError) and crashed.reason == "worker_died"
        assert str(crashed) == "worker died: exit code 9"
        assert isinstance(after, list) and after[0].doc == "after"
        assert (await p.run(task("again")))[0].doc == "again"
    finally:
        await p.close()


async def test_a_timeout_counts_from_when_the_worker_starts_the_task() -> None:
    # Two tasks of 1 s each, both sent at once to the one worker: the second starts
    # after the first, 2 s after it was sent, and must not time out at 1.6 s.
    p = pool(timeout_s=1.6)
    await p.open()
    try:
        outs = await asyncio.gather(*(p.run(task(f"w{n}", do="work", seconds=1.0)) for n in (1, 2)))
        assert outs[0][0].data["pid"] == outs[1][0].data["pid"]
    finally:
        await p.close()


async def test_building_the_stages_does_not_count_against_the_first_task() -> None:
    p = pool(timeout_s=1.0, open_s=1.5)
    await p.open()
    try:
        assert (await p.run(task("first")))[0].doc == "first"
    finally:
        await p.close()


async def test_a_task_the_worker_cannot_unpickle_fails_alone_and_the_worker_lives() -> None:
    p = pool()
    await p.open()
    try:
        before = (await p.run(task("before")))[0].data["pid"]
        with pytest.raises(ValueError, match="cannot be rebuilt here"):
            await p.run(task("bad", thing=Unloadable()))
        assert (await p.run(task("after")))[0].data["pid"] == before
    finally:
        await p.close()


async def test_close_ends_the_calls_its_workers_still_hold() -> None:
    p = pool()
    await p.open()
    hung = asyncio.create_task(p.run(task("hang", do="hang")))
    await asyncio.sleep(0)  # run() has sent it
    assert len(p._workers[0].tasks) == 1  # type: ignore[attr-defined]
    await p.close()
    await asyncio.wait({hung}, timeout=10)  # without close() ending it, never done
    assert hung.cancelled()


async def test_a_stage_that_cannot_open_fails_each_task_with_its_reason() -> None:
    p = pool(refuse=True)
    await p.open()
    try:
        for doc in ("a", "b"):
            with pytest.raises(PermanentError) as refused:
                await p.run(task(doc))
            assert refused.value.reason == "toy_open"
    finally:
        await p.close()


async def test_a_task_too_big_for_the_pipe_waits_for_an_idle_worker() -> None:
    p = pool()
    await p.open()
    try:
        busy = asyncio.create_task(p.run(task("busy", do="work", seconds=0.5)))
        big = asyncio.create_task(p.run(task("big", blob="x" * 1_000_000)))
        await asyncio.sleep(0)  # each run() has dispatched what it could
        worker = p._workers[0]  # type: ignore[attr-defined]
        assert len(worker.tasks) == 1  # a small one would wait in its pipe; not this
        assert len(p._waiting) == 1  # type: ignore[attr-defined]
        small = await p.run(task("small"))  # behind the big one, in order
        assert [out[0].doc for out in await asyncio.gather(busy, big)] == ["busy", "big"]
        assert small[0].doc == "small"
    finally:
        await p.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_worker_is_named_after_its_stage_for_top_and_ps() -> None:
    p = pool()
    await p.open()
    try:
        (out,) = await p.run(task("a"))
        assert name(out.data["pid"]) == "work worker"
    finally:
        await p.close()
