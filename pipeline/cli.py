"""The `pipeline` command: run, watch, search, validate, status, failed, retry, schema,
serve-embeddings.

User mistakes end with one clear line and exit 2 before any work; a run that
cannot go on ends with exit 3; nothing a user can cause prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from pipeline.config import PipelineConfig, load_config, ray_installed
from pipeline.errors import ConfigError, FatalError, InUseError
from pipeline.fusion import declared, fuse
from pipeline.heap import keep_heap_pad
from pipeline.outcome import EXIT_CONFIG, EXIT_FATAL, EXIT_OK
from pipeline.stage import AsyncStage, QueryEmbedder, Searcher, Stage
from pipeline.vector_space import check_space

__all__ = ["main"]

logger = logging.getLogger("pipeline")
_WAIT_STEP_S = 0.25


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose - args.quiet, args.log_format)
    try:
        code: int = args.command(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except FatalError as exc:
        _err(f"error: {exc}")
        return EXIT_FATAL
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="count", default=0)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=fn)
        return p

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=Path("pipeline.yaml"))

    p = command("run", _cmd_run, "Index the source folder.")
    config_arg(p)
    _run_args(p)
    p = command("watch", _cmd_watch, "Index the source folder, then keep following its changes.")
    config_arg(p)
    _executor_args(p)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--no-progress", action="store_true", help="plain status lines, no live view")
    p = command("retry", _cmd_retry, "Requeue failed documents (all, or those named) and run.")
    config_arg(p)
    p.add_argument("paths", nargs="*", help="documents to retry, as `pipeline failed` lists them")
    _run_args(p)
    p = command("search", _cmd_search, "Search the collection.")
    config_arg(p)
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="how many hits")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for an embedded store a running pass holds (default 30)",
    )
    p = command("validate", _cmd_validate, "Check the config and show the stage graph.")
    config_arg(p)
    p = command("status", _cmd_status, "Documents by status and the last run.")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p = command("failed", _cmd_failed, "List failed documents (the dead letters).")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p = command("optimize", _cmd_optimize, "Compact and index the store (slow; not during a run).")
    config_arg(p)
    command("schema", _cmd_schema, "Print the JSON Schema of pipeline.yaml.")
    p = command(
        "serve-embeddings",
        _cmd_serve,
        "Serve an OpenAI-compatible embedding API: a local model, or the hash model.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model",
        help="a sentence-transformers model name or folder, on this machine (needs the local "
        "extra); default: hash-384, which matches words, not meaning (tests, benchmarks)",
    )
    p.add_argument(
        "--served-name", help="the model name clients send (default: --model, or hash-384)"
    )
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay every reply")
    return parser


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor", choices=("local", "ray"), help="where stages run (default: the config's)"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (implies --executor ray)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _executor_args(p)
    p.add_argument("--source", type=Path, help="index this folder instead of source.path")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--no-progress", action="store_true", help="plain status lines, no live view")
    p.add_argument("--report", type=Path, help="write a JSON report of the run here")


def _setup_logging(level: int, fmt: str) -> None:
    """-q: warnings only; default: info (start, stop, resume, each failed document); -v: debug."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)
    for noisy in ("httpx", "httpcore", "pypdf", "watchfiles"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _err(text: str) -> None:
    sys.stderr.write(text.rstrip() + "\n")


# -- run ---------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    return _run(args, requeue=None)


def _cmd_retry(args: argparse.Namespace) -> int:
    return _run(args, requeue=args.paths)


def _run(args: argparse.Namespace, *, requeue: list[str] | None) -> int:
    """`run`, or with `requeue` (a list, empty for all) `retry`: failed documents first
    become pending again, and the run picks them up like any interrupted document."""
    config = _with_executor(load_config(args.config, source=args.source), args)
    _check_run_flags(args)
    from pipeline.session import run_session  # the heavier imports only when running

    if requeue is not None:
        from pipeline.state import open_state

        state = open_state(config.state, exclusive=True)
        try:
            logger.info("requeued %d failed documents", state.requeue(requeue or None))
        finally:
            state.close()
    return run_session(
        config,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        progress=not args.no_progress,
        report=args.report,
    )


def _cmd_watch(args: argparse.Namespace) -> int:
    config = _with_executor(load_config(args.config), args)
    args.report = None
    _check_run_flags(args)
    from pipeline.watch import watch_session

    return watch_session(
        config,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        progress=not args.no_progress,
    )


def _with_executor(config: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    """`--executor` and `--ray-address` over the config's `executor` and `ray`."""
    executor = "ray" if args.ray_address else (args.executor or config.executor)
    if executor == "ray" and not ray_installed():
        raise ConfigError(
            "command line", "--executor", "Ray installed: pip install '.[ray]'", got="ray"
        )
    ray = config.ray
    if args.ray_address:
        ray = dataclasses.replace(ray, address=args.ray_address)
    stages = fuse(config.stages, executor=executor)  # what fuses depends on where it runs
    return dataclasses.replace(config, executor=executor, ray=ray, stages=stages)


def _check_run_flags(args: argparse.Namespace) -> None:
    """Mistakes in flags are found before the run, not after an hour of it."""
    port = args.metrics_port
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError("command line", "--metrics-port", "a port from 1 to 65535", got=port)
    report = args.report
    if report is not None and not report.resolve().parent.is_dir():
        raise ConfigError(
            "command line", "--report", "a file in an existing folder", got=str(report)
        )


# -- search ------------------------------------------------------------------------


def _cmd_search(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    hits = asyncio.run(_search(config, args.query, args.k, args.wait))
    if args.json:
        rows = [
            {"score": h.score, "path": h.path, "page": h.page, "chunk": h.chunk, "text": h.text}
            for h in hits
        ]
        sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        return EXIT_OK
    from pipeline.terminal import print_hits

    print_hits(args.query, hits)
    return EXIT_OK


async def _open_waiting(store: Stage, wait_s: float) -> None:
    """Open the store, waiting up to `wait_s` while another process holds it: a
    `pipeline watch` holds an embedded store only while a pass runs."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            store.open()
            return
        except InUseError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(_WAIT_STEP_S)


async def _search(config: PipelineConfig, query: str, k: int, wait_s: float) -> list[Any]:
    """Embed the query with the pipeline's own embedder, ask the pipeline's own store,
    once sure the store's collection was built by that embedder's model."""
    embedder: Stage | AsyncStage | None = None
    searcher: Stage | None = None
    for cfg in declared(config.stages):  # a store fused into the embedder included
        stage = cfg.cls(cfg.params, name=cfg.name, concurrency=1)
        if embedder is None and isinstance(stage, Stage | AsyncStage):
            embedder = stage if isinstance(stage, QueryEmbedder) else None
        if searcher is None and isinstance(stage, Stage) and isinstance(stage, Searcher):
            searcher = stage
    if embedder is None or searcher is None:
        raise ConfigError(
            str(config.file),
            "stages",
            "an embedding stage and a store stage to search with",
            show_got=False,
        )
    await _open_waiting(searcher, wait_s)
    try:
        check_space(config, {embedder.name: embedder, searcher.name: searcher})
        vector = await _embed_query(embedder, query)
        return list(cast(Searcher, searcher).search(vector, limit=k))
    finally:
        searcher.close()


async def _embed_query(embedder: Stage | AsyncStage, query: str) -> list[float]:
    """The query's vector from an API stage (async) or an in-process model (blocking)."""
    if isinstance(embedder, AsyncStage):
        await embedder.open()
        try:
            vectors = embedder.embed_texts([query])  # type: ignore[attr-defined]
            return list((await vectors)[0])
        finally:
            await embedder.close()
    await asyncio.to_thread(embedder.open)
    try:
        return list((await asyncio.to_thread(embedder.embed_texts, [query]))[0])  # type: ignore[attr-defined]
    finally:
        embedder.close()


# -- inspection --------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from pipeline.terminal import print_graph

    print_graph(config)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from pipeline.state import open_state

    state = open_state(config.state, exclusive=False)
    try:
        counts, last = state.counts(), state.last_run()
    finally:
        state.close()
    if args.json:
        sys.stdout.write(json.dumps({"documents": counts, "last_run": last}, indent=2) + "\n")
        return EXIT_OK
    from pipeline.terminal import print_status

    print_status(counts, last)
    return EXIT_OK


def _cmd_failed(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from pipeline.state import open_state

    state = open_state(config.state, exclusive=False)
    try:
        failed = state.failed()
    finally:
        state.close()
    rows = [
        {
            "path": d.path,
            "stage": d.stage,
            "error": d.reason,
            "message": d.message,
            "attempts": d.attempts,
            "updated": d.updated,
        }
        for d in failed
    ]
    if args.json:
        sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        return EXIT_OK
    from pipeline.terminal import print_failed

    print_failed(rows)
    return EXIT_OK


def _cmd_optimize(args: argparse.Namespace) -> int:
    """Kept off the hot path: Edge's optimize holds the GIL for minutes on large shards."""
    config = load_config(args.config)
    for cfg in declared(config.stages):  # a store fused into the embedder included
        stage = cfg.cls(cfg.params, name=cfg.name, concurrency=1)
        optimize = getattr(stage, "optimize", None)
        if isinstance(stage, Stage) and callable(optimize):
            stage.open()
            try:
                optimize()
            finally:
                stage.close()
            logger.info("optimized the store of stage %s", cfg.name)
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    del args
    from pipeline.schema import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    # The builtin server ships with the stages; the engine only starts it.
    server = importlib.import_module("stages.embed_server")
    served = importlib.import_module("stages.served_model")
    model = served.HashModel()
    if args.model is None:
        keep_heap_pad()  # hash-384's numpy temporaries would fault in fresh pages per request
    else:
        local = importlib.import_module("stages.local_model")
        try:
            model = served.SentenceModel(args.model, device=args.device, threads=args.threads)
        except (local.ModelNotFound, ImportError) as exc:
            raise ConfigError("command line", "--model", str(exc), got=args.model) from exc
    if args.served_name is not None:
        model.name = args.served_name
    server.serve(host=args.host, port=args.port, latency_s=args.latency_ms / 1000, model=model)
    return EXIT_OK
