"""An async pool whose event loop runs in a process of its own (`own_process: true`).

An embedding stage's calls cost CPU in whichever process makes them: the HTTP
client, JSON, decoding the replies (~70 ms per 1,000 chunks with httpx, measured
in bench/RESULTS.md section 8). In the engine's process that would count against
the one process every chunk passes through, the ceiling of the whole pipeline on
a machine with many cores. With `own_process: true` the stage's copy lives in a
child process with an event loop of its own; the engine sends each batch over a
pipe and gets the outputs back (one pickled message each way), while everything
that decides about the call stays in the engine: the adaptive limit, retries, the
breaker, timeouts, splitting a refused batch. The stage runs exactly as on an
in-process async pool: many calls at once, one copy, one client.

    the child dies    the calls in flight fail `worker_died` (the engine splits a
                      batch that fails so, so only an item that kills it fails
                      alone); the next call starts a new child and opens the stage
    the engine dies   the child reads end-of-file and exits
    a call times out  the engine cancels it in the child, as it would in-process

The child sends the stage's counters and notes back with every reply (and with a
call's outputs what the fused stages did on them), so metrics, the report and the
end-of-run notes read as they do in-process.

Stages fused into this one (pipeline.fusion: the store after the embedder) run in
the child too, each call's outputs in turn, each on threads of its own (they are
blocking stages). Then what a call sends back is only what the engine needs: on
the pipeline's last stage (`sink`), which items got through, not their fields.
The child opens the fused stages and says which model built a store's collection,
so the engine still checks it before any work (pipeline.vector_space).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple

from pipeline import registry
from pipeline.errors import FatalError, InUseError, PermanentError, StageError, exit_reason
from pipeline.pools import FusedWork, PoolBase, StageSpec, fused_failure, run_fused, within
from pipeline.process_name import set_process_name
from pipeline.stage import AsyncStage, Item, PoolKind, Stage
from pipeline.vector_space import ModelRecord, Recorded

__all__ = ["AsyncProcessPool"]

logger = logging.getLogger(__name__)

_CLOSE_S = 30.0  # how long closing waits for the child to finish its calls
_REOPEN_S = 10.0  # how long a new child waits for a store the last one held
_REOPEN_STEP_S = 0.2


class AsyncProcessPool(PoolBase):
    kind: PoolKind = "async"

    def __init__(
        self,
        stage: AsyncStage,
        *,
        spec: StageSpec,
        size: int,
        timeout_s: float | None,
        fused: Sequence[StageSpec] = (),
        sink: bool = False,
    ) -> None:
        self.size = size
        self.batch_size = stage.batch_size
        # Never opened: the child holds the working copy; this one adds up its counts.
        self.stage = stage
        self._spec = spec
        self._fused = list(fused)
        self._sink = sink
        self._recorded: dict[str, Recorded] = {}  # a fused store's model, as opened
        self._timeout_s = timeout_s
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._notes: list[str] = []
        self._child: BaseProcess | None = None
        self._conn: Connection | None = None
        self._starting = asyncio.Lock()
        self._child_started = False  # a child ran before: a new one replaces it

    def notes(self) -> list[str]:
        """The child's notes as of its latest reply."""
        return self._notes

    def copies(self) -> dict[str, object]:
        return {self.stage.name: self.stage, **self._recorded}

    async def open(self) -> None:
        """Start the child and open the stage in it; the stage's own error if it cannot
        open, a FatalError if the child dies before it could say."""
        try:
            await self._started()
        except PermanentError as exc:  # died before answering: no call could run
            raise FatalError(f"{self._spec.name}: its process did not start: {exc}") from exc

    async def run(self, items: list[Item]) -> list[Item]:
        out: list[Item]
        out, work = await within(self._timeout_s, self._call("run", items))
        # What the fused stages did is counted once the call succeeded: not for a
        # call that failed or timed out, which the engine tries again.
        self._add_fused(work)
        return out

    async def discard(self, docs: Sequence[str]) -> None:
        await self._call("discard", list(docs))

    async def close(self) -> None:
        child, conn = self._child, self._conn
        if child is None or conn is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_S):
                await self._call("close", None)
        except Exception:  # noqa: BLE001 - the child is ended below either way
            logger.exception("closing %s's process failed", self._spec.name)
        finally:
            self._stop_reading(conn)
            self._child = self._conn = None
            await asyncio.get_running_loop().run_in_executor(None, _end, child, conn)

    # -- calls ---------------------------------------------------------------------

    async def _call(self, what: str, argument: Any) -> Any:
        conn = await self._started()
        call = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call] = future
        try:
            conn.send((what, call, argument))
        except OSError:
            self._pending.pop(call, None)
            raise _died(self._child) from None
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call, None) is not None and self._conn is conn:
                with contextlib.suppress(OSError):  # a child that died has nothing to cancel
                    conn.send(("cancel", call, None))  # a timeout, or the run stopping
            raise

    async def _started(self) -> Connection:
        """The child's end of the pipe, starting the child (and opening the stage) first
        if there is none: at open, or after the last one died.

        After a death, what the last child held may take a moment to be let go: a
        fused store's lock stays with its own child (the Edge process) until that
        one reads end-of-file, which waits for a write in progress. So a new child
        that finds the store in use tries again for up to `_REOPEN_S`; at open, in
        use means another run, and it says so at once."""
        async with self._starting:
            if self._conn is not None:
                return self._conn
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _REOPEN_S if self._child_started else None
            while True:
                try:
                    return await self._start()
                except InUseError:
                    if deadline is None or loop.time() >= deadline:
                        raise
                    await asyncio.sleep(_REOPEN_STEP_S)

    async def _start(self) -> Connection:
        self._child_started = True
        context = multiprocessing.get_context("forkserver")  # never fork a threaded parent
        mine, theirs = context.Pipe()
        child = context.Process(
            target=_serve,
            args=(theirs, self._spec, self.size, self._fused),
            kwargs={"sink": self._sink},
            name=f"{self._spec.name} (async)",
            daemon=True,
        )
        child.start()
        theirs.close()
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        self._pending[-1] = opened
        loop.add_reader(mine.fileno(), self._read, mine, child)
        self._child, self._conn = child, mine
        try:
            self._recorded = await opened
        except BaseException:
            self._stop_reading(mine)
            self._child = self._conn = None
            await loop.run_in_executor(None, _end, child, mine)
            raise
        return mine

    def _read(self, conn: Connection, child: BaseProcess) -> None:
        """A reply is waiting (read on the loop: a thread would cost the engine's
        process a hand-over per reply); at end-of-file, fail what is in flight."""
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            self._stop_reading(conn)
            self._lost(conn, child)
            return
        self._deliver(reply)

    @staticmethod
    def _stop_reading(conn: Connection) -> None:
        with contextlib.suppress(ValueError, OSError):  # a closed pipe has no fileno
            asyncio.get_running_loop().remove_reader(conn.fileno())

    def _deliver(self, reply: _Reply) -> None:
        call, status, value, counts, notes = reply
        self.stage.counts.update(counts)
        self._notes = notes
        future = self._pending.pop(call, None)
        if future is None or future.done():
            return  # cancelled meanwhile
        if status == "ok":
            future.set_result(value)
        else:
            future.set_exception(value)

    def _lost(self, conn: Connection, child: BaseProcess) -> None:
        """The child is gone: fail its calls in flight; the next call starts another."""
        if self._conn is not conn:
            return  # closed on purpose, or already replaced
        self._conn = self._child = None
        conn.close()
        error = _died(child)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


# A reply from the child: (call, "ok" or "error", the value or the exception, the
# stage's counts since the last reply, its notes).
_Reply = tuple[int, str, Any, Counter[tuple[str, str]], list[str]]


def _died(child: BaseProcess | None) -> PermanentError:
    if child is not None:
        child.join(timeout=1)
    code = child.exitcode if child is not None else None
    return PermanentError(f"the stage's process died ({exit_reason(code)})", reason="worker_died")


def _end(child: BaseProcess, conn: Connection) -> None:
    """Wait for the child to exit (kill it if it does not), then close our end."""
    child.join(timeout=_CLOSE_S)
    if child.is_alive():
        child.kill()
        child.join()
    conn.close()


# -- the child -------------------------------------------------------------------------


def _serve(
    conn: Connection, spec: StageSpec, size: int, fused: list[StageSpec], *, sink: bool
) -> None:
    """The child: build and open the stages, then run calls until close or end-of-file."""
    # The engine decides when to stop (Ctrl-C and SIGTERM reach the whole group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name(spec.name)
    asyncio.run(_Child(conn, spec, size, fused, sink=sink).serve())


class _Fused(NamedTuple):
    stage: Stage
    threads: ThreadPoolExecutor

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)

    async def process(self, items: list[Item]) -> tuple[list[Item], FusedWork]:
        result: tuple[list[Item], FusedWork] = await self.call(run_fused, self.stage, items)
        return result

    async def discard(self, docs: list[str]) -> None:
        """Its discard, on its threads: after any write still running there."""
        try:
            await self.call(self.stage.discard, docs)
        except Exception as exc:  # noqa: BLE001 - see fused_failure
            raise fused_failure(self.stage.name, exc)  # noqa: B904 - may be `exc`


class _Child:
    def __init__(
        self,
        conn: Connection,
        spec: StageSpec,
        size: int,
        fused: list[StageSpec],
        *,
        sink: bool,
    ) -> None:
        self.conn = conn
        self.spec = spec
        self.size = size
        self.specs = fused
        self.sink = sink
        self.stage: AsyncStage | None = None
        self.fused: list[_Fused] = []
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.closing: set[int] = set()
        self.sent: Counter[tuple[str, str]] = Counter()  # counts already sent
        self.done = asyncio.Event()

    async def serve(self) -> None:
        spec = self.spec
        try:
            stage = registry.resolve(spec.uses)(spec.params, name=spec.name, concurrency=self.size)
            if not isinstance(stage, AsyncStage):
                raise TypeError(f"{spec.uses} is not an async stage")
            self.stage = stage
            await stage.open()
            recorded = await self._open_fused()
        except Exception as exc:  # noqa: BLE001 - the engine raises it from open()
            self._reply(-1, "error", exc)
            return
        self._reply(-1, "ok", recorded)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True).start()
        await self.done.wait()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the engine is gone
            loop.call_soon_threadsafe(self._dispatch, message)

    def _dispatch(self, message: tuple[str, int, Any]) -> None:
        what, call, argument = message
        if what == "cancel":
            task = self.tasks.get(call)
            if task is not None:
                task.cancel()
            return
        work: Coroutine[Any, Any, Any]
        if what == "run":
            work = self._run(argument)
        elif what == "discard":
            work = self._discard(argument)
        else:
            self.closing.add(call)
            work = self._close()
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[call] = task
        task.add_done_callback(lambda t: self._finished(call, t))

    async def _open_fused(self) -> dict[str, Recorded]:
        """Open the fused stages; which model built each store's collection."""
        recorded = {}
        for spec in self.specs:
            stage = registry.resolve(spec.uses)(spec.params, name=spec.name, concurrency=spec.size)
            if not isinstance(stage, Stage):
                raise TypeError(f"{spec.uses} is not a blocking stage")
            fused = _Fused(stage, ThreadPoolExecutor(spec.size, thread_name_prefix=spec.name))
            self.fused.append(fused)
            await fused.call(stage.open)
            if isinstance(stage, ModelRecord):
                try:
                    recorded[spec.name] = Recorded(await fused.call(stage.recorded_model))
                except StageError as exc:  # the engine says so where it checks the model
                    recorded[spec.name] = Recorded(None, error=exc)
        return recorded

    async def _run(self, items: list[Item]) -> tuple[list[Item], list[FusedWork]]:
        """The call's outputs, and what each fused stage did on them."""
        assert self.stage is not None
        out = await self.stage.process(items)
        work = []
        for fused in self.fused:
            out, done = await fused.process(out)
            work.append(done)
        return ([Item(item.doc) for item in out] if self.sink else out), work

    async def _discard(self, docs: list[str]) -> None:
        assert self.stage is not None
        await self.stage.discard(docs)
        for fused in self.fused:
            await fused.discard(docs)

    async def _close(self) -> None:
        me = asyncio.current_task()
        running = [t for t in self.tasks.values() if t is not me and not t.done()]
        await asyncio.gather(*running, return_exceptions=True)
        assert self.stage is not None
        try:
            await self.stage.close()
        finally:
            for fused in self.fused:
                await fused.call(fused.stage.close)
                fused.threads.shutdown()

    def _finished(self, call: int, task: asyncio.Task[Any]) -> None:
        self.tasks.pop(call, None)
        if task.cancelled():
            return  # the engine stopped waiting for it
        error = task.exception()
        if error is None:
            self._reply(call, "ok", task.result())
        else:
            self._reply(call, "error", error)
        if call in self.closing:
            self.done.set()

    def _reply(self, call: int, status: str, value: Any) -> None:
        """Send a call's outcome, with what the stage counted since the last reply
        (its own counts keep growing: its notes may read them) and its notes now."""
        counts: Counter[tuple[str, str]] = Counter()
        notes: list[str] = []
        if self.stage is not None:
            counts = self.stage.counts - self.sent
            self.sent = self.stage.counts.copy()
            notes = self.stage.notes()
        try:
            self.conn.send((call, status, value, counts, notes))
        except (pickle.PicklingError, TypeError, AttributeError):  # an error that cannot travel
            text = f"{type(value).__name__}: {value}"
            self.conn.send((call, "error", RuntimeError(text), counts, notes))
