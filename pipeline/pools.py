"""Where a stage's `process` runs: a worker process, a thread, or the event loop.

All three look the same to the runner: `await pool.run(items)`. The runner drives
each pool with as many coroutines as the pool has workers, so busy workers and
queue depths are counted in one place whatever the pool kind.

- process: CPU work (PDF parsing), in `pipeline.process_pool`: worker processes
  that are killed and replaced when a task overruns its timeout, and whose death
  (segfault, os._exit, out of memory) fails only the task they held.
- thread: blocking clients (the Qdrant store). One stage copy shared by threads.
- async: I/O (embedding calls). N coroutines share one stage copy and one loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, TypeVar

from pipeline import registry
from pipeline.errors import FatalError, PermanentError, StageError
from pipeline.stage import AsyncStage, Item, PoolKind, Stage, StageBase

__all__ = [
    "FusedWork",
    "Pool",
    "PoolBase",
    "StageSpec",
    "ThreadPool",
    "build_chain",
    "fused_failure",
    "open_pool",
    "run_chain",
    "run_fused",
    "timed_out",
    "within",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StageSpec(NamedTuple):
    """What a worker process needs to build a stage: it is sent, not the stage."""

    uses: str
    name: str
    params: dict[str, Any]
    size: int = 1  # its threads, where a fused stage has threads of its own


class FusedWork(NamedTuple):
    """One call of a stage fused into another (pipeline.fusion), as the worker that ran
    it saw it: the engine counts it under the fused stage's own name, so its items and
    time stay visible although no channel or pool of its own carries them."""

    stage: str
    items: int  # what it took in
    pages: int  # pages its inputs carried (the engine counts pages from that field)
    seconds: float


class Pool(Protocol):
    kind: PoolKind
    size: int
    batch_size: int

    def take_fused(self) -> list[FusedWork]:
        """What the stages fused into this one did inside its workers since the last call."""

    def nodes(self) -> dict[str, int]:
        """Items each machine handled (node id -> items); empty on one machine."""

    def notes(self) -> list[str]:
        """The stage's end-of-run notes (`StageBase.notes`), wherever it ran."""

    @property
    def stage(self) -> StageBase:
        """The engine's copy of the stage: the working one on thread and async pools,
        on a process pool an unopened copy that adds up what the workers counted."""

    def copies(self) -> dict[str, object]:
        """What the engine can ask of each stage the pool runs, by name, for checks
        across stages (`pipeline.vector_space`): `stage`, and for a stage fused into
        a process of the pool's, what that process found out about it."""

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
    sink: bool = False,
) -> Pool:
    """Build the pool of `kind` for one stage; `await pool.open()` starts it.

    `fused` stages run in the same process, on each call's outputs in turn (see
    pipeline.fusion): a process pool's workers, or the child process that
    `own_process` gives an async pool (see pipeline.async_process). `sink`: the
    pipeline's last stage, whose outputs the engine only counts."""
    stage = cls(params, name=name, concurrency=size)  # cheap by contract: no I/O before open()
    if kind == "process":
        from pipeline.process_pool import ProcessPool

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
        return AsyncProcessPool(
            stage, spec=spec, size=size, timeout_s=timeout_s, fused=fused, sink=sink
        )
    return AsyncPool(stage, size=size, timeout_s=timeout_s)


def timed_out(seconds: float) -> PermanentError:
    """The failure of a call that overran the stage's `timeout_s`."""
    return PermanentError(f"timed out after {seconds:g} s", reason="timeout")


async def within(seconds: float | None, call: Awaitable[T]) -> T:
    """Await `call` within the stage's `timeout_s`; overrunning fails the items."""
    if seconds is None:
        return await call
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError:
        raise timed_out(seconds) from None


class PoolBase:
    """What most pools answer alike (see `Pool`): what fused stages did (if any ran),
    one machine, the engine's copy's notes, that copy for checks across stages."""

    stage: StageBase
    _fused_work: list[FusedWork] | None = None  # a pool whose workers run fused stages

    def take_fused(self) -> list[FusedWork]:
        work, self._fused_work = self._fused_work or [], None
        return work

    def _add_fused(self, work: Sequence[FusedWork]) -> None:
        """Keep what one successful call's fused stages did, for `take_fused`."""
        if self._fused_work is None:
            self._fused_work = []
        self._fused_work += work

    def nodes(self) -> dict[str, int]:
        return {}

    def notes(self) -> list[str]:
        return self.stage.notes()

    def copies(self) -> dict[str, object]:
        return {self.stage.name: self.stage}


class _InProcess(PoolBase):
    """A pool whose stage copy works in this process."""

    def __init__(self, stage: StageBase, *, size: int, timeout_s: float | None) -> None:
        self.size = size
        self.batch_size = stage.batch_size
        self._timeout_s = timeout_s


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


def run_chain(
    chain: Sequence[Stage], items: list[Item]
) -> tuple[list[Item], list[FusedWork], Counter[tuple[str, str]]]:
    """Run `chain` on `items`: the outputs of the last stage, what each fused stage
    did, and what the first stage counted since the last call that returned."""
    first, *fused = chain
    try:
        out = first.process(items)
        work = []
        for stage in fused:
            out, done = run_fused(stage, out)
            work.append(done)
    except BaseException:
        first.counts.clear()  # the engine retries or splits the call: it counts again
        raise
    counts, first.counts = first.counts, Counter()
    return out, work, counts


def run_fused(stage: Stage, items: list[Item]) -> tuple[list[Item], FusedWork]:
    """One call of a fused stage on its host's outputs, timed; what it raises is its own."""
    pages = sum(len(i.data["pages"]) for i in items if isinstance(i.data.get("pages"), list))
    began = time.perf_counter()
    try:
        out = stage.process(items)
    except Exception as exc:  # noqa: BLE001 - see fused_failure
        raise fused_failure(stage.name, exc)  # noqa: B904 - may be `exc` itself
    return out, FusedWork(stage.name, len(items), pages, time.perf_counter() - began)


def fused_failure(stage: str, exc: Exception) -> Exception:
    """What a fused stage's exception becomes: a StageError its own, not the host's
    (the document fails at `stage`); a FatalError as it was (the run stops); anything
    else a bug of that stage, which fails its items, as in pipeline.batch."""
    if isinstance(exc, FatalError):
        return exc
    if isinstance(exc, StageError):
        error = exc
    else:
        error = PermanentError(f"{type(exc).__name__}: {exc}", reason="bug")
        error.__cause__ = exc
    error.stage = stage
    return error
