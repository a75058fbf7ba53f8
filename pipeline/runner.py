"""Running a pipeline: pools for the stages, channels between them, one ledger.

    source walk -> [queue] -> stage 1 pool -> [queue] -> stage 2 pool -> ... -> last stage

Every stage runs as N coroutines (N = its pool size, twice that for a process
pool) that take a batch from the channel feeding it, run it on the pool, and put
the results on the next channel.
A full channel makes `put` wait, which is how a slow stage holds back every
stage before it and, in the end, the walk of the source folder.

Failures stay with their documents (see `pipeline.batch`: retries, and splitting
a rejected batch until the bad item is alone), unless every document fails alike
(`pipeline.systemic`). A FatalError stops the run.

A stage with an adaptive pool (async pools by default) sends at most as many
calls at once as its `AdaptiveLimit` allows, however many workers it has: a
worker takes a slot before it takes a batch, so batches wait in the channel (and
fill up) rather than in workers' hands.

Stopping: `stop()` closes intake and lets in-flight work finish for up to
`shutdown_timeout_s`, then cancels; `stop(now=True)` cancels at once. Either
way documents not finished stay `pending` and the next run resumes them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pipeline.batch import run_batch
from pipeline.channel import Channel
from pipeline.config import PipelineConfig, cpu_count
from pipeline.cpu import busy_seconds
from pipeline.disk import CHECK_EVERY_S, low_space, written_paths
from pipeline.errors import ConfigError, FatalError, StageError, TransientError
from pipeline.executor import Executor, LocalExecutor
from pipeline.intake import Intake
from pipeline.ledger import Finished, Ledger
from pipeline.limit import Permit
from pipeline.metrics import Metrics
from pipeline.outcome import RunOutcome
from pipeline.retry import RetryPolicy
from pipeline.stage import Item
from pipeline.stage_state import StageState, StageView
from pipeline.state import RunState
from pipeline.systemic import Failures
from pipeline.vector_space import check_space

__all__ = ["Runner"]

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
_PRUNE_BATCH = 256


class Runner:
    """One run of a pipeline over its source; `await run()` returns the outcome."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        state: RunState,
        metrics: Metrics | None = None,
        sleep: Sleep = asyncio.sleep,
        settle_s: float = 0.0,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.executor: Executor = executor or LocalExecutor()
        self.state = state
        self.metrics = metrics or Metrics()
        self.outcome = RunOutcome()
        self.ledger = Ledger()
        self._sleep = sleep
        self._stages: list[StageState] = []
        self._intake: Intake | None = None
        self._work: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._cancelled = False
        self._tokens = itertools.count()
        self._settle_s = settle_s  # files modified more recently are left for later
        # Where a failure may have left part of a document written: the last stage.
        last = config.stages[-1]
        self._last = {last.name, *(fused.name for fused in last.fused)}

    # -- observation -------------------------------------------------------------

    def views(self) -> list[StageView]:
        return [st.refresh() for st in self._stages]

    def full_since(self, stage: str) -> float | None:
        """When the channel feeding `stage` became full, if it is full now."""
        for st in self._stages:
            if st.cfg.name == stage:
                return st.inbox.full_since()
        return None

    def _touch(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[Runner], bool]) -> None:
        """Wait until `predicate(self)` holds; re-checked whenever the run changes."""
        while not predicate(self):
            self._changed.clear()
            await self._changed.wait()

    # -- control -----------------------------------------------------------------

    def stop(self, *, signal_name: str = "SIGTERM", now: bool = False) -> None:
        """Stop intake and drain (or, with `now`, cancel in-flight work at once)."""
        if self.outcome.stopped_by is None:
            self.outcome.stopped_by = signal_name
            logger.info("%s: stopping intake, finishing in-flight work", signal_name)
        if self._intake is not None:
            self._intake.stop()
        if self._stages:
            self._stages[0].inbox.close()
        if now:
            self._cancel()
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.shutdown_timeout_s, self._cancel)

    async def _watch_disk(self, written: list[Path]) -> None:
        """Stop the run when free space runs short mid-run: intake stops and in-flight
        work drains (exit 3); if the drain itself eats half the margin, in-flight work
        is cancelled too (its documents stay pending)."""
        floor = self.config.min_free_mb
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            short = low_space(written, floor if self.outcome.fatal is None else floor / 2)
            if short is None:
                continue
            if self.outcome.fatal is None:
                logger.error("disk almost full: %s; stopping intake, draining", short)
                self.outcome.fatal = short
                self.outcome.low_disk = True
                self.stop(signal_name="low disk space")
            else:
                logger.error("disk still filling while draining: %s; stopping now", short)
                self.stop(signal_name="low disk space", now=True)
                return

    def _cancel(self) -> None:
        if self._work is not None and not self._work.done():
            self._cancelled = True
            self._work.cancel()

    # -- the run -----------------------------------------------------------------

    async def run(self) -> RunOutcome:
        """The run, to its outcome. Raises FatalError before any work if a filesystem
        it writes to has less than `min_free_mb` free."""
        written = written_paths(self.config)
        short = low_space(written, self.config.min_free_mb)
        if short is not None:
            raise FatalError(short)
        started = time.monotonic()
        cpu_before = busy_seconds()
        run_id = self.state.begin_run()
        disk = asyncio.create_task(self._watch_disk(written), name="disk")
        logger.info("run %d started over %s", run_id, self.config.source.path)
        try:
            await self._open_stages()
            self._intake = Intake(
                root=self.config.source.path,
                pattern=self.config.source.glob,
                state=self.state,
                run=run_id,
                ledger=self.ledger,
                outcome=self.outcome,
                discard=self._discard,
                on_handed=self.metrics.source_documents.inc,
                settle_s=self._settle_s,
            )
            if self.outcome.stopped_by is not None:
                self._intake.stop()
            self._work = asyncio.create_task(self._flow(self._intake))
            try:
                await self._work
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
            except BaseExceptionGroup as group:
                fatal = _first_fatal(group)
                if fatal is None:
                    raise
                self.outcome.fatal = str(fatal)
            if self._may_prune():
                await self._prune(run_id)
        except FatalError as exc:
            self.outcome.fatal = str(exc)
        except ConfigError as exc:  # found once the stages were open: still before any work
            self.outcome.fatal = str(exc)
            self.outcome.config_error = True
        finally:
            disk.cancel()
            self.outcome.interrupted += len(self.ledger)
            await self._close_stages()
            self.outcome.seconds = time.monotonic() - started
            cpu_after = busy_seconds()
            if cpu_before is not None and cpu_after is not None and self.outcome.seconds > 0:
                share = (cpu_after - cpu_before) / (self.outcome.seconds * cpu_count())
                self.outcome.cpu_busy = min(1.0, share)
            self.state.end_run(
                run_id,
                outcome=self.outcome.outcome,
                exit_code=self.outcome.exit_code,
                summary=self.outcome.to_dict(),
            )
            self.metrics.dead_letters.set(self.state.counts().get("failed", 0))
        if self.outcome.fatal:
            logger.error("run %d stopped: %s", run_id, self.outcome.fatal)
        logger.info("run %d finished: %s", run_id, self.outcome.outcome)
        return self.outcome

    async def _open_stages(self) -> None:
        for cfg in self.config.stages:
            pool = self.executor.open_pool(cfg, sink=cfg is self.config.stages[-1])
            # `queue` counts what one worker takes at once: a batch. Counted in items, a
            # queue of 2 x workers would starve a batching stage into batches of 2.
            capacity = cfg.queue * pool.batch_size
            inbox: Channel[Item] = Channel(capacity, on_change=self._touch)
            retry = RetryPolicy(
                attempts=cfg.retry.attempts,
                base=cfg.retry.base_s,
                cap=cfg.retry.cap_s,
                max_wait_s=cfg.retry.max_wait_s,
                name=cfg.name,
                sleep=self._sleep,
                on_retry=self._retry_counter(cfg.name),
            )
            st = StageState(cfg, pool, inbox, retry)
            self._stages.append(st)
            st.meters = self.metrics.watch_stage(
                cfg.name,
                capacity=capacity,
                workers=pool.size,
                depth=st.depth,
                busy=st.busy,
                limit=st.allowed,
            )
            for fused in st.view.fused_views:
                st.fused_meters[fused.name] = self.metrics.watch_fused(
                    fused.name, workers=fused.workers
                )
            self.metrics.watch_counters(pool.stage)
            await pool.open()
        try:
            copies = {name: c for st in self._stages for name, c in st.pool.copies().items()}
            check_space(self.config, copies)
        except StageError as exc:  # the store could not say (a server timing out)
            raise FatalError(f"cannot read which model built the collection: {exc}") from exc

    async def _close_stages(self) -> None:
        for st in self._stages:
            self.outcome.notes += [f"{st.cfg.name}: {note}" for note in st.pool.notes()]
            try:
                await st.pool.close()
            except Exception:  # noqa: BLE001 - closing must reach every pool; recorded
                logger.exception("closing stage %s failed", st.cfg.name)

    def _retry_counter(self, stage: str) -> Callable[[TransientError], None]:
        def count(error: TransientError) -> None:
            self.metrics.retries.labels(stage, error.reason).inc()
            self.outcome.retry_reasons[f"{stage}: {error.reason}"] += 1
            for st in self._stages:
                if st.cfg.name == stage:
                    st.view.retries += 1
            self._touch()

        return count

    async def _flow(self, intake: Intake) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(intake.feed(self._stages[0].inbox), name="source")
            for i, st in enumerate(self._stages):
                outbox = self._stages[i + 1].inbox if i + 1 < len(self._stages) else None
                tg.create_task(self._run_stage(st, outbox), name=st.cfg.name)

    async def _run_stage(self, st: StageState, outbox: Channel[Item] | None) -> None:
        """Run the stage's workers; close `outbox` after the last one, even on failure,
        so downstream sees end-of-input exactly once and never hangs."""
        try:
            async with asyncio.TaskGroup() as tg:
                for n in range(st.drivers):
                    tg.create_task(self._worker(st, outbox), name=f"{st.cfg.name}-{n}")
            # No success and no verdict either: what was held is the documents' own.
            await self._handle(st, outbox, [], [], st.systemic.drain())
        finally:
            if outbox is not None:
                outbox.close()

    async def _worker(self, st: StageState, outbox: Channel[Item] | None) -> None:
        while True:
            permit = await st.limit.acquire() if st.limit is not None else None
            try:
                batch = await st.inbox.get_batch(st.batch_size, linger=st.linger)
            except BaseException:
                st.give_back(permit)
                raise
            if not batch:
                st.give_back(permit)
                return
            # Split once: releasing a dead item may await, and another worker may fail
            # a document meanwhile; an item must be either released here or processed.
            failed = {doc for doc in {item.doc for item in batch} if self.ledger.has_failed(doc)}
            dead = [item for item in batch if item.doc in failed] if failed else []
            live = [item for item in batch if item.doc not in failed] if failed else batch
            if not live:
                st.give_back(permit)
            for item in dead:
                await self._release(item.doc)
            if not live:
                continue
            slots = [permit] if permit is not None else []
            try:
                outputs, failures = await run_batch(
                    self._attempt(st, slots),
                    live,
                    retry=st.retry,
                    stage=st.cfg.name,
                    verdict=st.systemic,
                )
            finally:
                for unused in slots:  # the run stopped before the first try
                    st.give_back(unused)
            await self._handle(st, outbox, live, outputs, st.systemic.screen(failures))

    def _attempt(
        self, st: StageState, slots: list[Permit]
    ) -> Callable[[list[Item]], Awaitable[list[Item]]]:
        """One try of a batch, within the stage's adaptive limit (if it has one).

        The first try uses the slot the worker reserved before taking the batch;
        retries and split halves take a slot again, so a cut limit holds for them
        too. What the try taught (its latency, or an overload) goes back to the
        limit before any retry. A try that found the server unavailable keeps its
        slot: the retry waits on the breaker's probe, which must not wait for a
        slot held by workers that wait on it."""
        limit = st.limit
        if limit is None:
            return lambda items: self._timed(st, items)

        async def attempt(items: list[Item]) -> list[Item]:
            if slots:
                permit = slots.pop()
            elif st.retry.breaker.open:  # the probe: holders of slots wait on it
                permit = limit.take()
            else:
                permit = await limit.acquire()
            limit.begin(permit)
            try:
                result = await self._timed(st, items)
            except TransientError as exc:
                if exc.unavailable:  # the retry waits on the breaker, not for a slot
                    limit.observe(permit, overloaded=exc.overloaded)
                    slots.append(permit)
                else:
                    limit.release(permit, overloaded=exc.overloaded)
                raise
            except BaseException:
                limit.release(permit)
                raise
            limit.release(permit, size=len(items))
            return result

        return attempt

    async def _handle(
        self,
        st: StageState,
        outbox: Channel[Item] | None,
        live: list[Item],
        outputs: list[Item],
        failures: Failures,
    ) -> None:
        """Account one batch's results to their documents and pass the outputs on.

        Held items (see `pipeline.systemic`) keep their documents open: they are
        neither failed nor released until the stage's verdict is in."""
        # Counted per document, not per item: a document's chunks travel together.
        produced = Counter(map(_doc, outputs))
        for doc, count in produced.items():
            self.ledger.add(doc, count)
            if outbox is None:
                self.ledger.sink(doc, count)
        if outputs and isinstance(outputs[0].data.get("pages"), list):
            # The documented field of page-producing stages (a call's outputs are all
            # of one stage: pages in the first, pages in all).
            self.outcome.pages += sum(len(out.data.get("pages") or ()) for out in outputs)
        self.outcome.pages += st.count_fused(st.pool.take_fused())  # pages they consumed
        # `failures` may include held ones of earlier batches, released by a success.
        for item, error in failures:
            self.ledger.fail(item.doc, stage=error.stage or st.cfg.name, error=error)
            st.count_failed(error.stage)
        if failures or st.systemic.holding:
            failed = {id(item) for item, _ in failures}
            done = sum(1 for i in live if id(i) not in failed and not st.systemic.holds(i))
            freed = Counter(i.doc for i in live if not st.systemic.holds(i))
        else:  # the usual batch: every item done
            done, freed = len(live), Counter(map(_doc, live))
        st.view.done += done
        st.view.failed += len(failures)
        st.meters.items_ok.inc(done)
        if failures:
            st.meters.items_failed.inc(len(failures))
            mine = {id(item) for item in live}
            for item, _error in failures:
                if id(item) not in mine:
                    await self._release(item.doc)  # held by an earlier batch until now
        for doc, count in freed.items():
            await self._release(doc, count)
        # Outputs of failed documents (and the last stage's) end here; the rest go on.
        ended = {doc for doc in produced if outbox is None or self.ledger.has_failed(doc)}
        for doc in ended:
            await self._release(doc, produced[doc])
        if outbox is not None:
            await outbox.put_many([o for o in outputs if o.doc not in ended] if ended else outputs)

    async def _timed(self, st: StageState, items: list[Item]) -> list[Item]:
        """One call of the stage's pool, counted as busy time for views and metrics."""
        self._busy(st, +1)
        began = time.monotonic()
        token = next(self._tokens)
        st.view.running[token] = began
        try:
            return await st.pool.run(items)
        finally:
            elapsed = time.monotonic() - began
            self._busy(st, -1)
            del st.view.running[token]
            st.view.durations.append(elapsed)
            st.meters.seconds.observe(elapsed)

    def _busy(self, st: StageState, change: int) -> None:
        seconds = st.track_busy(change)
        st.meters.busy_seconds.inc(seconds)
        self._touch()

    async def _release(self, doc: str, count: int = 1) -> None:
        finished = self.ledger.release(doc, count)
        if finished is not None:
            await self._finish(finished)

    async def _finish(self, done: Finished) -> None:
        outcome = self.outcome
        outcome.record_time(done.doc, done.seconds)
        if done.failure is None:
            self.state.mark_indexed(done.doc, chunks=done.sunk)
            outcome.indexed += 1
            outcome.chunks += done.sunk
            if done.kind == "updated":
                outcome.updated += 1
            else:
                outcome.added += 1
            self.metrics.documents.labels("indexed").inc()
        else:
            stage, error = done.failure
            if done.sunk or stage in self._last:
                await self._discard([done.doc])  # no half-indexed document stays searchable
            message = str(error)
            self.state.mark_failed(done.doc, stage=stage, reason=error.reason, message=message)
            outcome.record_failure(done.doc, stage=stage, reason=error.reason, message=message)
            self.metrics.documents.labels("failed").inc()
            logger.warning("failed %s at %s: %s", done.doc, stage, message)
        self._touch()

    async def _discard(self, docs: Sequence[str]) -> None:
        """Remove what stages keep of `docs`, with the stage's retries.

        A store that cannot delete cannot keep the collection right: the run stops
        (exit 3) and the documents stay pending, so the next run deletes again.
        """
        for st in self._stages:
            try:
                await st.retry.call(functools.partial(st.pool.discard, list(docs)))
            except StageError as exc:
                raise FatalError(f"{st.cfg.name} could not remove old points: {exc}") from exc

    def _may_prune(self) -> bool:
        o = self.outcome
        return (
            self.config.source.prune
            and o.walk_complete
            and not o.walk_errors
            and o.stopped_by is None
            and o.fatal is None
        )

    async def _prune(self, run_id: int) -> None:
        """Remove the points of documents no longer in the source (a complete walk only)."""
        gone = list(self.state.not_seen_since(run_id))
        for start in range(0, len(gone), _PRUNE_BATCH):
            batch = gone[start : start + _PRUNE_BATCH]
            await self._discard(batch)
            self.state.remove(batch)
        self.outcome.removed = len(gone)
        if gone:
            logger.info("removed %d documents no longer in the source", len(gone))


_doc = operator.attrgetter("doc")


def _first_fatal(group: BaseExceptionGroup[BaseException]) -> FatalError | None:
    """The FatalError inside nested task-group errors, if that is what ended the run."""
    for error in group.exceptions:
        if isinstance(error, FatalError):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _first_fatal(error)
            if found is not None:
                return found
    return None
