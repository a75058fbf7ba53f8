"""One `pipeline run` from the command line: state, metrics, signals, progress, summary.

The runner knows nothing of terminals or signals; this module wires them to it
and turns the outcome into an exit code. It is the only place that owns the
state database's lock for a run, so a second run fails here, before any work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.disk import low_space, written_paths
from pipeline.errors import ConfigError, FatalError
from pipeline.executor import Executor, open_executor
from pipeline.fusion import overridden
from pipeline.metrics import Metrics
from pipeline.outcome import RunOutcome
from pipeline.report import Watchdog, build_report, report_hints
from pipeline.runner import Runner
from pipeline.stage_state import StageView
from pipeline.state import RunState, open_state

__all__ = ["observed", "prepared", "run_session", "status_line"]

logger = logging.getLogger(__name__)

PLAIN_EVERY_S = 10.0
_WATCH_EVERY_S = 1.0


@contextlib.contextmanager
def prepared(
    config: PipelineConfig, *, metrics_port: int | None, metrics_host: str
) -> Iterator[tuple[RunState, Metrics, Executor]]:
    """The state (locked for this process), the metrics (served if asked) and the
    executor of a run or a watch; refused before anything is written if space is
    short. Enter it before the event loop starts: ray.init takes SIGTERM's handler,
    and the loop's own handlers must come after it."""
    for line in overridden(config.stages):
        logger.warning("%s", line)
    short = low_space(written_paths(config), config.min_free_mb)
    if short is not None:  # before anything is written, the state included
        raise FatalError(short)
    state = open_state(config.state, exclusive=True)
    pending = state.counts().get("pending", 0)
    if pending:
        logger.info("resuming: %d documents were pending from an earlier run", pending)
    metrics = Metrics()
    server = None
    if metrics_port is not None:
        try:
            server = metrics.serve(metrics_port, host=metrics_host)
        except OSError as exc:
            state.close()
            raise ConfigError(
                "command line",
                "--metrics-port",
                "a free port",
                got=f"{metrics_port} ({exc.strerror})",
            ) from exc
        logger.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    try:
        executor = open_executor(config)
        try:
            yield state, metrics, executor
        finally:
            executor.close()
    finally:
        if server is not None:
            server.shutdown()
        state.close()


def run_session(
    config: PipelineConfig,
    *,
    metrics_port: int | None,
    metrics_host: str,
    progress: bool,
    report: Path | None,
) -> int:
    """Run the pipeline once; returns the exit code (see pipeline.outcome)."""
    with prepared(config, metrics_port=metrics_port, metrics_host=metrics_host) as (
        state,
        metrics,
        executor,
    ):
        runner = Runner(config, state=state, metrics=metrics, executor=executor)
        outcome = asyncio.run(_drive(runner, live=progress and sys.stderr.isatty()))
    from pipeline.terminal import print_summary

    views = runner.views()
    print_summary(outcome, report_hints(outcome, views))
    if report is not None:
        try:
            report.write_text(json.dumps(build_report(outcome, views), indent=2) + "\n")
        except OSError as exc:
            logger.error("could not write the report to %s: %s", report, exc.strerror)
    return outcome.exit_code


async def _drive(runner: Runner, *, live: bool) -> RunOutcome:
    loop = asyncio.get_running_loop()
    sigints = 0

    def on_sigint() -> None:
        nonlocal sigints
        sigints += 1
        runner.stop(signal_name="SIGINT", now=sigints > 1)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, lambda: runner.stop(signal_name="SIGTERM"))
    return await observed(runner, live=live)


async def observed(runner: Runner, *, live: bool) -> RunOutcome:
    """Run `runner` to its outcome with the live view (or the status line) and the
    watchdog's warnings beside it."""
    task = asyncio.create_task(runner.run())
    watchers = [asyncio.create_task(_warn(runner))]
    if live:
        from pipeline.terminal import live_view

        watchers.append(asyncio.create_task(live_view(runner)))
    else:
        watchers.append(asyncio.create_task(_plain(runner)))
    try:
        return await task
    finally:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def status_line(runner: Runner, *, elapsed: float) -> str:
    """The progress line for logs when there is no terminal to draw on."""
    o = runner.outcome
    stages = " ".join(
        f"{v.name}[{v.busy}/{v.workers} busy{_limit(v)}, queue {v.depth}/{v.capacity}]"
        for v in runner.views()
    )
    return (
        f"{elapsed:.0f}s: {o.indexed + o.skipped + o.failed}/{o.discovered} documents "
        f"({o.indexed} indexed, {o.skipped} skipped, {o.failed} failed), "
        f"{o.pages} pages, {o.chunks} chunks | {stages}"
    )


def _limit(view: StageView) -> str:
    if view.unavailable_s > 0:
        return f", paused {view.unavailable_s:.0f}s: server unavailable"
    return "" if view.limit is None else f", limit {view.limit}"


async def _plain(runner: Runner) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(PLAIN_EVERY_S)
        logger.info("%s", status_line(runner, elapsed=time.monotonic() - started))


async def _warn(runner: Runner) -> None:
    watchdog = Watchdog()
    while True:
        await asyncio.sleep(_WATCH_EVERY_S)
        views = runner.views()
        full_since = {v.name: runner.full_since(v.name) for v in views}
        for warning in watchdog.check(views, full_since, time.monotonic()):
            logger.warning("%s", warning)
