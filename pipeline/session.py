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
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.metrics import Metrics
from pipeline.outcome import RunOutcome
from pipeline.runner import Runner
from pipeline.state import open_state

__all__ = ["run_session"]

logger = logging.getLogger(__name__)

_PLAIN_EVERY_S = 10.0


def run_session(
    config: PipelineConfig,
    *,
    metrics_port: int | None,
    metrics_host: str,
    progress: bool,
    report: Path | None,
) -> int:
    """Run the pipeline once; returns the exit code (see pipeline.outcome)."""
    state = open_state(config.state, exclusive=True)
    metrics = Metrics()
    server = metrics.serve(metrics_port, host=metrics_host) if metrics_port is not None else None
    try:
        runner = Runner(config, state=state, metrics=metrics)
        outcome = asyncio.run(_drive(runner, live=progress and sys.stderr.isatty()))
    finally:
        if server is not None:
            server.shutdown()
        state.close()
    from pipeline.terminal import print_summary

    print_summary(outcome, runner.views())
    if report is not None:
        _write_report(report, runner, outcome)
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
    task = asyncio.create_task(runner.run())
    watcher = asyncio.create_task(_watch(runner, live=live))
    try:
        return await task
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _watch(runner: Runner, *, live: bool) -> None:
    """The live view on a terminal; elsewhere a plain status line every 10 s."""
    if live:
        from pipeline.terminal import live_view

        await live_view(runner)
        return
    started = time.monotonic()
    while True:
        await asyncio.sleep(_PLAIN_EVERY_S)
        o = runner.outcome
        stages = " ".join(
            f"{v.name}:{v.busy}/{v.workers}busy,q{v.depth}/{v.capacity}" for v in runner.views()
        )
        logger.info(
            "%.0fs: %d discovered, %d indexed, %d skipped, %d failed | %s",
            time.monotonic() - started,
            o.discovered,
            o.indexed,
            o.skipped,
            o.failed,
            stages,
        )


def _write_report(path: Path, runner: Runner, outcome: RunOutcome) -> None:
    seconds = max(outcome.seconds, 1e-9)
    body = {
        **outcome.to_dict(),
        "docs_per_s": outcome.indexed / seconds,
        "chunks_per_s": outcome.chunks / seconds,
        "stages": [
            {
                "name": v.name,
                "pool": v.kind,
                "workers": v.workers,
                "items_done": v.done,
                "items_failed": v.failed,
                "retries": v.retries,
                "busy_seconds": round(v.busy_seconds, 3),
                "utilisation": round(v.busy_seconds / (seconds * v.workers), 3),
            }
            for v in runner.views()
        ],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
