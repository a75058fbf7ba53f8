"""The process pool for CPU stages: worker processes driven from the event loop.

Each worker has a pipe of its own; the loop writes a task to it and reads the
result when the pipe turns readable. There is no thread in between: pebble and
concurrent.futures hand every task and every result through threads of their
own, and in the engine's process, the one every chunk passes through, that cost
~0.5 ms of CPU a task (bench/RESULTS.md section 14), more than the task's own
pickling.

    a task past timeout_s    its worker is killed and replaced; the task fails
                             `timeout`, the one waiting behind it goes to another
    a worker that dies       (segfault, os._exit, the OOM killer) its task fails
                             `worker_died` with the exit code or signal; the task
                             waiting behind it goes to another worker
    memory_mb                an address-space cap in the worker: a MemoryError fails
                             the task `out_of_memory` and the worker lives on
    the engine dies          a worker reads end-of-file after its task and exits

A worker holds up to two tasks: one running, one waiting in its pipe, so it never
idles for a round trip through the engine (+26% pages/s on 2 cores, RESULTS.md
section 6 A). A task's timeout counts from when its worker starts it: when the
result before it arrives, or when a new worker says its stages are built. A task
too big for the pipe's buffer goes to an idle worker only, so writing it never
blocks the loop behind a running task.

Workers start through forkserver, never fork (the engine's process has threads
that a fork would copy mid-lock), on the first tasks, and build their stages then.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import resource
import signal
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from pipeline.errors import PermanentError, exit_reason
from pipeline.pools import PoolBase, StageSpec, build_chain, run_chain, timed_out
from pipeline.process_name import set_process_name
from pipeline.stage import Item, PoolKind, Stage, StageBase

__all__ = ["ProcessPool"]

_TASKS_PER_WORKER = 2
_PIPE_SAFE_BYTES = 32 * 1024  # a task this big may wait in a busy worker's pipe
_PROTOCOL = pickle.HIGHEST_PROTOCOL  # plain pickle: tasks hold no pipes or sockets
_CLOSE_S = 2.0  # how long closing waits for idle workers to exit before killing them

# A worker's reply: ("ok", (outputs, fused work, counts)) or ("error", the exception).
Reply = tuple[str, Any]


class _Task:
    __slots__ = ("future", "payload")

    def __init__(self, payload: bytes, future: asyncio.Future[Reply]) -> None:
        self.payload = payload
        self.future = future


class _Worker:
    __slots__ = ("conn", "process", "ready", "tasks", "timer")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.ready = False  # its stages are built: the first task it holds is running
        self.tasks: deque[_Task] = deque()  # sent, in order: the first one is running
        self.timer: asyncio.TimerHandle | None = None


class ProcessPool(PoolBase):
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
        # Never opened: each worker process holds its own working copy. This one adds
        # up the counts the workers send back, for metrics, the report and notes().
        self.stage: StageBase = stage
        self._chain = list(chain)
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._workers: list[_Worker] = []
        self._waiting: deque[_Task] = deque()  # not sent to a worker yet

    async def open(self) -> None:
        return None  # workers start on the first tasks and build their stages then

    async def run(self, items: list[Item]) -> list[Item]:
        task = _Task(pickle.dumps(items, _PROTOCOL), asyncio.get_running_loop().create_future())
        self._waiting.append(task)
        self._dispatch()
        try:
            status, value = await task.future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):  # sent already: its result is dropped
                self._waiting.remove(task)
            raise
        if status == "error":
            raise self._error(value)
        outputs: list[Item]
        outputs, work, counts = value
        self._add_fused(work)
        self.stage.counts.update(counts)
        return outputs

    async def discard(self, docs: Sequence[str]) -> None:
        del docs  # process stages keep nothing between documents

    async def close(self) -> None:
        """End the workers: an idle one exits when its pipe closes; one still busy
        (the run was cut short) is killed."""
        workers, self._workers = self._workers, []
        loop = asyncio.get_running_loop()
        for worker in workers:
            self._forget(worker)
            worker.conn.close()
            for task in worker.tasks:
                task.future.cancel()
        for task in self._waiting:
            task.future.cancel()
        self._waiting.clear()
        if workers:
            await loop.run_in_executor(None, _end, [w.process for w in workers])

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send waiting tasks to workers with room, starting workers up to the size."""
        while self._waiting:
            task = self._waiting[0]
            worker = self._worker_for(len(task.payload))
            if worker is None:
                return
            self._waiting.popleft()
            if task.future.done():
                continue  # cancelled while it waited
            try:
                worker.conn.send_bytes(task.payload)
            except OSError:  # the worker died; reading its end-of-file will say so
                self._waiting.appendleft(task)
                self._lost(worker)
                continue
            worker.tasks.append(task)
            if len(worker.tasks) == 1:
                self._arm(worker)

    def _worker_for(self, size: int) -> _Worker | None:
        """An idle worker, else a new one, else one with room in its pipe."""
        idle = [w for w in self._workers if not w.tasks]
        if idle:
            return idle[0]
        if len(self._workers) < self.size:
            return self._start()
        if size > _PIPE_SAFE_BYTES:
            return None
        return min(
            (w for w in self._workers if len(w.tasks) < _TASKS_PER_WORKER),
            key=lambda w: len(w.tasks),
            default=None,
        )

    def _start(self) -> _Worker:
        context = multiprocessing.get_context("forkserver")
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_work,
            args=(theirs, self._chain, self.size, self._memory_mb),
            name=f"{self._chain[0].name} worker",
            daemon=True,
        )
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        self._workers.append(worker)
        asyncio.get_running_loop().add_reader(mine.fileno(), self._readable, worker)
        return worker

    def _arm(self, worker: _Worker) -> None:
        """Time the task the worker runs now (the first it holds), if any; not before
        its stages are built (loading a model is not the task's time)."""
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        if worker.ready and worker.tasks and self._timeout_s is not None:
            worker.timer = asyncio.get_running_loop().call_later(
                self._timeout_s, self._overran, worker
            )

    # -- results ---------------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        try:
            payload = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._lost(worker)
            return
        if not worker.ready:  # its first message: the stages are built
            worker.ready = True
            self._arm(worker)
            return
        if not worker.tasks:
            return  # nothing asked: cannot happen, but never fail on it
        task = worker.tasks.popleft()
        self._arm(worker)  # the next one it holds has started
        try:
            reply = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - e.g. an exception class that cannot load
            reply = ("error", RuntimeError(f"its result could not be read: {exc!r}"))
        if not task.future.done():
            task.future.set_result(reply)
        self._dispatch()

    def _overran(self, worker: _Worker) -> None:
        worker.process.kill()
        self._drop(worker, timed_out(self._timeout_s or 0))

    def _lost(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)  # its pipe is closed: it is exiting
        died = f"worker died: {exit_reason(worker.process.exitcode)}"
        self._drop(worker, PermanentError(died, reason="worker_died"))

    def _drop(self, worker: _Worker, error: PermanentError) -> None:
        """Fail the worker's running task; the one waiting behind it goes to another."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        self._forget(worker)
        worker.conn.close()
        if worker.tasks:
            running = worker.tasks.popleft()
            self._waiting.extendleft(reversed(worker.tasks))
            if not running.future.done():
                running.future.set_result(("error", error))
        if worker.process.is_alive():  # killed: reap it off the loop
            asyncio.get_running_loop().run_in_executor(None, worker.process.join)
        self._dispatch()

    def _forget(self, worker: _Worker) -> None:
        if worker.timer is not None:
            worker.timer.cancel()
        with contextlib.suppress(ValueError, OSError):  # a closed pipe has no fileno
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())

    def _error(self, value: BaseException) -> BaseException:
        if isinstance(value, MemoryError):
            return PermanentError(
                f"worker ran out of memory (memory_mb: {self._memory_mb})", reason="out_of_memory"
            )
        return value


def _end(processes: list[BaseProcess]) -> None:
    for process in processes:
        process.join(timeout=_CLOSE_S)
        if process.is_alive():
            process.kill()
            process.join()


# -- the worker ------------------------------------------------------------------------


def _work(conn: Connection, chain: list[StageSpec], workers: int, memory_mb: int | None) -> None:
    """A worker: build the stages, then run tasks until the pipe closes."""
    # Ctrl-C and SIGTERM reach the whole process group; the engine decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name(f"{chain[0].name} worker")
    if memory_mb is not None:  # so a ballooning PDF fails alone
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stages: list[Stage] = []
    broken: BaseException | None = None
    try:
        stages = build_chain(chain, workers=workers)
    except Exception as exc:  # noqa: BLE001 - every task says why
        broken = exc
    try:
        conn.send_bytes(b"")  # ready: the engine times tasks from here
    except OSError:
        return
    while True:
        try:
            task = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the engine closed the pool, or is gone
        reply: tuple[str, Any]
        try:
            if broken is not None:
                raise broken
            reply = ("ok", run_chain(stages, pickle.loads(task)))
        except Exception as exc:  # noqa: BLE001 - the engine decides what it means
            reply = ("error", exc)
        try:
            payload = pickle.dumps(reply, _PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - an error that cannot travel, or no memory
            text = f"{type(reply[1]).__name__}: {reply[1]}" if reply[0] == "error" else repr(exc)
            error = MemoryError() if isinstance(exc, MemoryError) else RuntimeError(text)
            payload = pickle.dumps(("error", error), _PROTOCOL)
        try:
            conn.send_bytes(payload)
        except OSError:
            return
