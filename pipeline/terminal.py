"""Everything the CLI shows a person: tables, the run summary, the live view.

rich stays here, out of the engine: the runner exposes plain numbers
(`Runner.views()`, `Runner.outcome`) and this module draws them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from pipeline.config import PipelineConfig
from pipeline.executor import placement
from pipeline.fusion import overridden
from pipeline.outcome import RunOutcome
from pipeline.stage import Hit

if TYPE_CHECKING:
    from pipeline.runner import Runner
    from pipeline.stage_state import StageView

__all__ = [
    "live_view",
    "print_failed",
    "print_graph",
    "print_hits",
    "print_status",
    "print_summary",
    "render_frame",
]

_REDRAW_S = 0.25


def _out() -> Console:
    return Console(highlight=False)


def print_graph(config: PipelineConfig) -> None:
    table = Table(title=f"{config.file}: source {config.source.path} ({config.source.glob})")
    for column in ("stage", "uses", "pool", "workers", "queue", "batch", "timeout_s"):
        table.add_column(column)
    placements = []
    for st in config.stages:
        where = st.cls(st.params, name=st.name, concurrency=st.pool.size).placement()
        on = placement(config, st)
        for line in (on, where):
            if line:
                placements.append(f"{st.name}: {line}")
        table.add_row(
            st.name,
            st.uses,
            f"{st.pool.kind}, own process"
            if st.pool.own_process and config.executor == "local"  # Ray: an actor anyway
            else st.pool.kind,
            f"up to {st.pool.size}, adaptive" if st.pool.adaptive else str(st.pool.size),
            str(st.queue),
            str(st.params.get("batch", 1)),
            "-" if st.timeout_s is None else f"{st.timeout_s:g}",
        )
        for fused in st.fused:
            where = "workers" if st.pool.kind == "process" else "process"
            table.add_row(fused.name, fused.uses, f"in {st.name}'s {where}", "-", "-", "-", "-")
    _out().print(table)
    for line in [*placements, *overridden(config.stages)]:
        _out().print(line)
    _out().print(f"state: {config.state}; executor: {config.executor}")


def print_hits(query: str, hits: list[Hit]) -> None:
    console = _out()
    console.print(f"[bold]{query}[/bold]")
    if not hits:
        console.print("  no hits (is the collection indexed?)")
    for hit in hits:
        snippet = " ".join(hit.text.split())[:160]
        console.print(f"  {hit.score:.3f}  {hit.path} p.{hit.page}  [dim]{snippet}[/dim]")


def print_status(counts: dict[str, int], last: dict[str, Any] | None) -> None:
    console = _out()
    total = sum(counts.values())
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"documents: {total} ({parts or 'none yet'})")
    if last is not None:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["started"]))
        console.print(f"last run: #{last['id']} started {started}, {last['outcome'] or 'running'}")


def print_failed(rows: list[dict[str, Any]]) -> None:
    if not rows:
        _out().print("no failed documents")
        return
    table = Table(title=f"{len(rows)} failed documents")
    for column in ("path", "stage", "error", "attempts", "message"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["path"],
            row["stage"] or "",
            row["error"] or "",
            str(row["attempts"]),
            row["message"] or "",
        )
    _out().print(table)


def print_summary(outcome: RunOutcome, advice: list[str]) -> None:
    console = Console(stderr=True, highlight=False)
    o = outcome
    console.print(
        f"[bold]{o.outcome}[/bold] in {o.seconds:.1f}s: {o.discovered} discovered, "
        f"{o.indexed} indexed ({o.added} added, {o.updated} updated), {o.skipped} skipped "
        f"({o.unchanged} unchanged, {o.duplicates} duplicates), {o.failed} failed, "
        f"{o.removed} removed, {o.chunks} chunks"
    )
    if o.interrupted:
        console.print(f"{o.interrupted} documents were in flight: the next run resumes them")
    if o.previously_failed:
        console.print(
            f"{o.previously_failed} documents failed before and are unchanged: "
            "`pipeline failed` lists them, `pipeline retry` tries again"
        )
    for reason, count in o.failure_reasons.most_common():
        console.print(f"  [red]{count} failed[/red] at {reason}")
        for example in o.failure_examples.get(reason, [])[:3]:
            console.print(f"    {example}")
    for note in o.notes:
        console.print(f"note: {note}")
    if o.fatal:
        console.print(f"[red]stopped: {o.fatal}[/red]")
    for line in advice:
        console.print(f"hint: {line}")


def render_frame(outcome: RunOutcome, views: list[StageView], *, elapsed: float) -> Group:
    """One frame of the live view, from plain numbers: testable without a terminal."""
    o = outcome
    finished = o.indexed + o.failed + o.skipped
    per_s = elapsed if elapsed > 0 else 1e-9
    total = f"{o.discovered}" if o.walk_complete else f"{o.discovered}+"
    eta = ""
    if o.walk_complete and finished and finished < o.discovered:
        eta = f" | ETA {(o.discovered - finished) * elapsed / finished:.0f}s"
    head = Text(
        f"{finished}/{total} documents ({o.indexed} indexed, {o.skipped} skipped, "
        f"{o.failed} failed) | {o.pages / per_s:.1f} pages/s | {o.chunks / per_s:.1f} chunks/s"
        f" | {elapsed:.0f}s{eta}"
    )
    table = Table(expand=False)
    for column in (
        "stage",
        "pool",
        "busy",
        "limit",
        "queue",
        "done",
        "rate/s",
        "retries",
        "failed",
    ):
        table.add_column(
            column, justify="left" if column in ("stage", "pool", "queue") else "right"
        )
    for v in views:
        filled = round(10 * v.depth / v.capacity) if v.capacity else 0
        bar = "█" * filled + "·" * (10 - filled)
        table.add_row(
            v.name,
            v.kind,
            f"{v.busy}/{v.workers}",
            _limit(v),
            f"{bar} {v.depth}/{v.capacity}",
            str(v.done),
            f"{v.done / per_s:.1f}",
            str(v.retries),
            str(v.failed),
        )
        for f in v.fused_views:  # no queue or workers of its own: it runs in v's calls
            table.add_row(
                f"└ {f.name}", f"in {v.name}", "-", "-", "-", str(f.done),
                f"{f.done / per_s:.1f}", "-", str(f.failed),
            )  # fmt: skip
    return Group(head, table)


def _limit(view: StageView) -> str:
    """Calls allowed in flight: the adaptive limit, or a paused pool's wait."""
    if view.unavailable_s > 0:
        return f"paused {view.unavailable_s:.0f}s"
    return "-" if view.limit is None else str(view.limit)


async def live_view(runner: Runner) -> None:
    """Redraw a few times a second; log lines print above the view, not through it."""
    started = time.monotonic()
    console = Console(stderr=True)
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = RichHandler(console=console, show_path=False, markup=False)
    root.handlers = [handler]
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                frame = render_frame(
                    runner.outcome, runner.views(), elapsed=time.monotonic() - started
                )
                live.update(frame, refresh=True)
                await asyncio.sleep(_REDRAW_S)
    finally:
        root.handlers = saved
