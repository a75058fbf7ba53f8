"""`pipeline watch`: the index follows the folder.

It catches up exactly as `pipeline run` does, then keeps running: every pass is
an ordinary incremental run over the same state, so a new or changed PDF is
indexed (its old points replaced), a deleted one's points are removed, a renamed
one moves, and every outcome, metric and dead letter is a run's. What starts a
pass:

- filesystem events (watchfiles: inotify and its like), as soon as they arrive;
- a rescan every `watch.rescan_s`, because events get lost (network filesystems,
  an overflowing inotify queue, changes made while no watcher ran);
- files a pass left for later because they were modified less than
  `watch.settle_s` ago (maybe still being written): a pass `settle_s` later.

Between passes nothing is held but a set of changed names, so a burst of 10,000
files is worked off through the bounded channels of one pass, never queued as
work. The embedded store is open only during a pass: `pipeline search` works
while the watcher waits, and waits for a pass to end. Below `min_free_mb` a pass
stops and the watcher pauses, warns, and resumes by itself when space returns.
SIGTERM drains the current pass and exits 143 (SIGINT: 130).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.disk import low_space, written_paths
from pipeline.errors import FatalError
from pipeline.executor import Executor
from pipeline.metrics import Metrics
from pipeline.outcome import EXIT_SIGNAL
from pipeline.runner import Runner
from pipeline.session import observed, prepared
from pipeline.source import matches
from pipeline.state import RunState

__all__ = ["watch_session"]

logger = logging.getLogger(__name__)

_SPACE_CHECK_S = 5.0


def watch_session(
    config: PipelineConfig, *, metrics_port: int | None, metrics_host: str, progress: bool
) -> int:
    """Watch until a signal; returns the exit code (143 after SIGTERM, 130 after SIGINT)."""
    with prepared(config, metrics_port=metrics_port, metrics_host=metrics_host) as (
        state,
        metrics,
        executor,
    ):
        watcher = Watcher(config, state=state, metrics=metrics, executor=executor)
        return asyncio.run(watcher.run(live=progress and sys.stderr.isatty()))


class Watcher:
    """Passes over the source folder, one at a time, for as long as it is told to."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        state: RunState,
        metrics: Metrics,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.state = state
        self.metrics = metrics
        self.passes = 0
        self.passed = asyncio.Event()  # set at the end of every pass (for whoever waits)
        self.changed: set[str] = set()  # names events reported since the last pass began
        self._wake = asyncio.Event()
        self._stopped_by: str | None = None
        self._runner: Runner | None = None
        self._sigints = 0

    def stop(self, signal_name: str) -> None:
        """Stop watching: the current pass drains (a second SIGINT cancels it)."""
        if signal_name == "SIGINT":
            self._sigints += 1
        self._stopped_by = self._stopped_by or signal_name
        if self._runner is not None:
            self._runner.stop(signal_name=signal_name, now=self._sigints > 1)
        self._wake.set()

    async def run(self, *, live: bool) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, lambda: self.stop("SIGINT"))
        loop.add_signal_handler(signal.SIGTERM, lambda: self.stop("SIGTERM"))
        events = asyncio.create_task(self._events(), name="events")
        try:
            return await self._passes(live=live)
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events

    async def _passes(self, *, live: bool) -> int:
        settle = self.config.watch.settle_s
        while self._stopped_by is None:
            self.passes += 1
            self.changed.clear()
            self._wake.clear()
            runner = Runner(
                self.config,
                state=self.state,
                metrics=self.metrics,
                settle_s=settle,
                executor=self.executor,
            )
            self._runner = runner
            try:
                outcome = await observed(runner, live=live)
            except FatalError:
                if low_space(written_paths(self.config), self.config.min_free_mb) is None:
                    raise
                await self._wait_for_space()  # refused before the pass began: space
                continue
            finally:
                self._runner = None
                self.passed.set()
            logger.info(
                "pass %d: %d indexed, %d failed, %d unchanged, %d removed, %d left to settle",
                self.passes,
                outcome.indexed,
                outcome.failed,
                outcome.unchanged,
                outcome.removed,
                outcome.deferred,
            )
            if self._stopped_by is not None:
                break
            if outcome.low_disk:
                await self._wait_for_space()
                continue
            if outcome.fatal is not None:
                logger.error("stopped watching: %s", outcome.fatal)
                return outcome.exit_code
            await self._next_pass(soon=settle if outcome.deferred else None)
        return EXIT_SIGNAL.get(self._stopped_by or "SIGTERM", 143)

    async def _next_pass(self, *, soon: float | None) -> None:
        """Wait for a change, the rescan, files to settle, or a signal."""
        if self.changed:
            return  # changed while the last pass ran: it may have walked past them
        rescan = self.config.watch.rescan_s
        wait = rescan if soon is None else min(soon, rescan)
        logger.info("watching %s; next rescan in %.0f s", self.config.source.path, rescan)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def _wait_for_space(self) -> None:
        """Paused: warn, and resume by ourselves once space is back."""
        written = written_paths(self.config)
        logger.warning("paused: waiting for free space to come back")
        while self._stopped_by is None:
            short = low_space(written, self.config.min_free_mb)
            if short is None:
                logger.warning("free space is back; resuming")
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SPACE_CHECK_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _events(self) -> None:
        """Collect the names that changed; wake the loop for those that matter: files
        the glob takes, and folders (a folder moved or removed carries its files)."""
        from watchfiles import awatch

        root = self.config.source.path
        pattern = self.config.source.glob
        ours = [path.resolve() for path in written_paths(self.config)]
        async for changes in awatch(root, recursive=True, debounce=200, step=50):
            for _change, name in changes:
                path = Path(name)
                if any(path == mine or mine in path.parents for mine in ours):
                    continue  # the run's own state or store, inside the source folder
                try:
                    relative = path.relative_to(root).as_posix()
                except ValueError:
                    continue
                if matches(pattern, relative) or not path.suffix:  # a folder, most likely
                    self.changed.add(relative)
            if self.changed and self._runner is None:
                self._wake.set()
