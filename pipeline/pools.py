"""Where a stage's `process` runs: a worker process, a thread, or the event loop.

All three look the same to the runner: `await pool.run(items)`. The runner drives
each pool with as many coroutines as the pool has workers, so busy workers and
queue depths are counted in one place whatever the pool kind.

- process: CPU work (PDF parsing). pebble's pool, because it does what
  concurrent.futures cannot: kill a worker that overruns its timeout and replace
  it, and report a worker that died (segfault, os._exit, out of memory) as
  ProcessExpired for that one task while the pool keeps its size. Workers start
  through forkserver, never fork: the parent has threads (metrics server, store
  client) that a fork would copy mid-lock.
- thread: blocking clients (the Qdrant store). One stage copy shared by threads.
- async: I/O (embedding calls). N coroutines share one stage copy and one loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import signal
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import pebble

from pipeline import registry
from pipeline.errors import PermanentError, StageError
from pipeline.stage import AsyncStage, Item, PoolKind, Stage, StageBase

__all__ = ["Pool", "StageSpec", "ThreadPool", "build_chain", "open_pool", "run_chain", "within"]

logger = logging.getLogger(__name__)


class StageSpec(NamedTuple):
    """What a worker process needs to build a stage: it is sent, not the stage."""

    uses: str
    name: str
    params: dict[str, Any]


class Pool(Protocol):
    kind: PoolKind
    size: int
    batch_size: int

    def take_pages(self) -> int:
        """Pages that fused stages consumed inside the workers since the last call."""

    def nodes(self) -> dict[str, int]:
        """Items each machine handled (node id -> items); empty on one machine."""

    def notes(self) -> list[str]:
        """The stage's end-of-run notes (`StageBase.notes`), wherever it ran."""

    @property
    def stage(self) -> StageBase:
        """The engine's copy of the stage: the working one on thread and async pools,
        on a process pool an unopened copy that adds up what the workers counted."""

    async def open(self) -> None: ...
    async def run(self, items: list[Item]) -> list[Item]: ...
    async def discard(self, docs: Sequence[str]) -> None: ...
    async def close(self) -> None: ...


def open_pool(
    cls: type[StageBase],
    *,
    uses: str,
    name: str,
    kind: PoolKind,
    size: int,
    params: Mapping[str, Any],
    timeout_s: float | None,
    memory_mb: int | None,
    fused: Sequence[StageSpec] = (),
    own_process: bool = False,
) -> Pool:
    """Build the pool of `kind` for one stage; `await pool.open()` starts it.

    `fused` stages (process pools only) run in the same workers, on each call's
    outputs in turn (see pipeline.fusion). `own_process` puts an async pool's event
    loop in a child process (see pipeline.async_process)."""
    stage = cls(params, name=name, concurrency=size)  # cheap by contract: no I/O before open()
    if kind == "process":
        return ProcessPool(
            stage,
            chain=[StageSpec(uses, name, dict(params)), *fused],
            size=size,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
        )
    if kind == "thread":
        if not isinstance(stage, Stage):
            raise TypeError(f"{uses} is not a blocking stage and cannot run on a thread pool")
        return ThreadPool(stage, size=size, timeout_s=timeout_s)
    if not isinstance(stage, AsyncStage):
        raise TypeError(f"{uses} is not an async stage and cannot run on an async pool")
    if own_process:
        from pipeline.async_process import AsyncProcessPool

        spec = StageSpec(uses, name, dict(params))
        return AsyncProcessPool(stage, spec=spec, size=size, timeout_s=timeout_s)
    return AsyncPool(stage, size=size, timeout_s=timeout_s)


def _timed_out(seconds: float) -> PermanentError:
    return PermanentError(f"timed out after {seconds:g} s", reason="timeout")


async def within(seconds: float | None, call: Awaitable[list[Item]]) -> list[Item]:
    """Await `call` within the stage's `timeout_s`; overrunning fails the items."""
    if seconds is None:
        return await call
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError:
        raise _timed_out(seconds) from None


class _InProcess:
    """A pool whose stage copy works in this process: no pages, nodes or notes but
    its own."""

    stage: StageBase

    def __init__(self, stage: StageBase, *, size: int, timeout_s: float | None) -> None:
        self.size = size
        self.batch_size = stage.batch_size
        self._timeout_s = timeout_s

    def take_pages(self) -> int:
        return 0

    def nodes(self) -> dict[str, int]:
        return {}

    def notes(self) -> list[str]:
        return self.stage.notes()


class AsyncPool(_InProcess):
    kind: PoolKind = "async"
    stage: AsyncStage

    def __init__(self, stage: AsyncStage, *, size: int, timeout_s: float | None) -> None:
        super().__init__(stage, size=size, timeout_s=timeout_s)
        self.stage = stage

    async def open(self) -> None:
        await self.stage.open()

    async def run(self, items: list[Item]) -> list[Item]:
        return await within(self._timeout_s, self.stage.process(items))

    async def discard(self, docs: Sequence[str]) -> None:
        await self.stage.discard(docs)

    async def close(self) -> None:
        await self.stage.close()


class ThreadPool(_InProcess):
    kind: PoolKind = "thread"
    stage: Stage

    def __init__(self, stage: Stage, *, size: int, timeout_s: float | None) -> None:
        super().__init__(stage, size=size, timeout_s=timeout_s)
        self.stage = stage
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix=stage.name)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def open(self) -> None:
        await self._call(self.stage.open)

    async def run(self, items: list[Item]) -> list[Item]:
        # A thread cannot be killed: on timeout the item fails and the call runs on
        # in the background. Stages that can hang belong on a process pool.
        return await within(self._timeout_s, self._call(self.stage.process, items))

    async def discard(self, docs: Sequence[str]) -> None:
        await self._call(self.stage.discard, list(docs))

    async def close(self) -> None:
        try:
            await self._call(self.stage.close)
        finally:
            self._threads.shutdown(wait=False, cancel_futures=True)


class ProcessPool:
    kind: PoolKind = "process"

    def __init__(
        self,
        stage: StageBase,
        *,
        chain: Sequence[StageSpec],
        size: int,
        timeout_s: float | None,
        memory_mb: int | None,
    ) -> None:
        self.size = size
        self.batch_size = stage.batch_size
        self.pages = 0
        # Never opened: each worker process holds its own working copy. This one adds
        # up the counts the workers send back, for metrics, the report and notes().
        self.stage: StageBase = stage
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._pool = pebble.ProcessPool(
            max_workers=size,
            initializer=_worker_init,
            initargs=(list(chain), size, memory_mb),
            context=multiprocessing.get_context("forkserver"),
        )

    async def open(self) -> None:
        return None  # workers start on the first task and build their stage then

    def take_pages(self) -> int:
        pages, self.pages = self.pages, 0
        return pages

    def nodes(self) -> dict[str, int]:
        return {}

    def notes(self) -> list[str]:
        return self.stage.notes()

    async def run(self, items: list[Item]) -> list[Item]:
        future = self._pool.schedule(_worker_process, args=(items,), timeout=self._timeout_s)
        try:
            result: tuple[list[Item], int, Counter[tuple[str, str]]] = await asyncio.wrap_future(
                future
            )
        except TimeoutError:
            raise _timed_out(self._timeout_s or 0) from None
        except pebble.ProcessExpired as died:
            raise PermanentError(
                f"worker died: {_exit_reason(died.exitcode)}", reason="worker_died"
            ) from None
        except MemoryError:
            raise PermanentError(
                f"worker ran out of memory (memory_mb: {self._memory_mb})", reason="out_of_memory"
            ) from None
        items, pages, counts = result
        self.pages += pages
        self.stage.counts.update(counts)
        return items

    async def discard(self, docs: Sequence[str]) -> None:
        del docs  # process stages keep nothing between documents

    async def close(self) -> None:
        self._pool.stop()  # type: ignore[no-untyped-call]
        await asyncio.get_running_loop().run_in_executor(None, self._pool.join)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return f"exit code {code}"


# Each worker process holds its own copy of its stages (the first, then any fused
# into it); this is per-process state by nature, set once by the pool's initializer.
_worker_chain: list[Stage] = []


def _worker_init(chain: list[StageSpec], workers: int, memory_mb: int | None) -> None:
    """Build the stages in the worker; cap its memory so a ballooning PDF fails alone."""
    # Ctrl-C reaches the whole process group; the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_mb is not None:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _worker_chain.extend(build_chain(chain, workers=workers))


def build_chain(chain: Sequence[StageSpec], *, workers: int) -> list[Stage]:
    """A worker's own copies of a stage and the stages fused into it, opened."""
    stages = []
    for spec in chain:
        stage = registry.resolve(spec.uses)(spec.params, name=spec.name, concurrency=workers)
        if not isinstance(stage, Stage):
            raise TypeError(f"{spec.uses} is not a blocking stage and cannot run on a process pool")
        stage.open()
        stages.append(stage)
    return stages


def _worker_process(items: list[Item]) -> tuple[list[Item], int, Counter[tuple[str, str]]]:
    if not _worker_chain:
        raise RuntimeError("worker used before its initializer ran")
    return run_chain(_worker_chain, items)


def run_chain(
    chain: Sequence[Stage], items: list[Item]
) -> tuple[list[Item], int, Counter[tuple[str, str]]]:
    """Run `chain` on `items`: the outputs of the last stage, the pages that the
    fused stages consumed (the engine counts pages from the `pages` field), and what
    the first stage counted since the last call that returned."""
    first, *fused = chain
    try:
        out, pages = _run_fused(first, fused, items)
    except BaseException:
        first.counts.clear()  # the engine retries or splits the call: it counts again
        raise
    counts, first.counts = first.counts, Counter()
    return out, pages, counts


def _run_fused(first: Stage, fused: Sequence[Stage], items: list[Item]) -> tuple[list[Item], int]:
    out = first.process(items)
    pages = 0
    for stage in fused:
        pages += sum(len(i.data["pages"]) for i in out if isinstance(i.data.get("pages"), list))
        try:
            out = stage.process(out)
        except StageError as exc:
            exc.stage = stage.name  # its failure is its own, not the host's
            raise
        except Exception as exc:  # noqa: BLE001 - a stage bug fails its items, as in batch.py
            error = PermanentError(f"{type(exc).__name__}: {exc}", reason="bug")
            error.stage = stage.name
            raise error from exc
    return out, pages
