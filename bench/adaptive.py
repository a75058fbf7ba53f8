"""The embed pool's adaptive limit against a server that is the limit, and one that scales.

    python -m bench.adaptive capacity --docs 60 --pages 3 --per-text-ms 50
    python -m bench.adaptive capacity --docs 60 --pages 3 --per-text-ms 50 --fixed --timeout-s 60
    python -m bench.adaptive capacity --docs 60 --pages 3 --per-text-ms 50 --slots 4
    python -m bench.adaptive scalable --docs 2400 --pages 3 --latency-ms 300 \
        --embed-workers 8 --batch 32
    python -m bench.adaptive scalable --docs 1200 --pages 3 --latency-ms 300 \
        --embed-workers 4 --batch 16

Both run the real `python -m pipeline run -c CONFIG --no-progress --report R` in a
subprocess, CONFIG being the repository's pipeline.yaml with its paths pointed into a
temporary folder under bench/out/ (`bench.throughput.write_config`), and read its report.

- `capacity`: a model server on a CPU. `tests.capacity_server.CapacityServer` runs in
  this process (threads that sleep: it costs no CPU) and computes `--slots` requests at
  a time, `--per-text-ms` per input text, queueing the rest without bound and computing
  abandoned requests too. The embed stage keeps pipeline.yaml's settings (pool 64,
  batch 64, the stage's default request timeout unless `--timeout-s`) with `model:
  capacity-384`; `--fixed` sets `pool.adaptive: false`, the fixed pool of before. The
  least time the server needs is its capacity time, chunks x per-text / slots; the
  targets are wall / capacity <= 1.3 and abandoned requests <= 2% of requests.
- `scalable`: the builtin server (`pipeline serve-embeddings --latency-ms L`, a
  subprocess), whose latency does not grow with load. The bound is pool x batch /
  latency chunks/s; the target is >= 90% of it where the CPU is not the limit, and the
  limit must climb to the ceiling (pool.size).

A run that goes past `--max-run-s` gets SIGINT twice (stop now; the report is still
written), then SIGKILL 30 s later, and is reported as stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.throughput import (
    OUT,
    PYTHON,
    ROOT,
    BenchOptions,
    TreeSampler,
    corpus_dir,
    embedding_server,
    machine,
    process_cpu_seconds,
    system_busy_seconds,
    write_config,
)

__all__ = [
    "CapacityOptions",
    "ScalableOptions",
    "bench_capacity",
    "bench_scalable",
    "compact_trace",
    "run_pipeline",
]

WALL_TARGET = 1.3  # capacity: wall / capacity time
ABANDONED_TARGET = 0.02  # capacity: abandoned share of requests
SHARE_TARGET = 0.9  # scalable: chunks/s over pool x batch / latency
KILL_GRACE_S = 30.0  # after the two SIGINTs, before SIGKILL
TRACE_EVERY_S = 5.0
TRACE_ALL_BELOW = 30  # traces with fewer changes than this are shown whole


# -- running the pipeline ------------------------------------------------------------------


@dataclass
class PipelineRun:
    """One `pipeline run` subprocess: exit, times, CPU, memory, and its report."""

    returncode: int
    wall_s: float  # of the process, start-up included
    cpu_s: float  # the process tree's user + system seconds
    peak_anon_mb: float
    stopped: bool  # ran past the deadline and was interrupted
    killed: bool  # did not stop within the grace after the SIGINTs
    report: dict[str, Any] | None


def _stopper(
    pid: int, max_s: float, done: threading.Event, lock: threading.Lock, flags: dict[str, bool]
) -> None:
    """Past `max_s`: SIGINT, SIGINT again (stop now), SIGKILL to the group after a grace."""
    steps: list[tuple[float, signal.Signals, str]] = [
        (max_s, signal.SIGINT, "stopped"),
        (1.0, signal.SIGINT, "stopped"),
        (KILL_GRACE_S, signal.SIGKILL, "killed"),
    ]
    for wait_s, sig, flag in steps:
        if done.wait(wait_s):
            return
        with lock:  # the process is not reaped while `done` is unset: the pid is still its
            if done.is_set():
                return
            flags[flag] = True
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)  # the extraction workers too
            else:
                os.kill(pid, sig)


def run_pipeline(config: Path, folder: Path, *, max_s: float) -> PipelineRun:
    """`pipeline run` on `config` with its report and log in `folder`, sampled meanwhile."""
    report = folder / "report.json"
    cmd = [str(PYTHON), "-m", "pipeline", "run", "-c", str(config), "--no-progress"]
    cmd += ["--report", str(report)]
    done = threading.Event()
    lock = threading.Lock()
    flags = {"stopped": False, "killed": False}
    with (folder / "run.log").open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        stopper = threading.Thread(
            target=_stopper, args=(proc.pid, max_s, done, lock, flags), daemon=True
        )
        stopper.start()
        with TreeSampler(proc.pid) as sampler:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            except BaseException:
                proc.kill()
                raise
            finally:
                with lock:
                    done.set()
                _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        stopper.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    body = json.loads(report.read_text()) if report.is_file() else None
    return PipelineRun(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=max(usage.ru_utime + usage.ru_stime, sampler.cpu_seconds),
        peak_anon_mb=sampler.peak_anon_kb / 1024,
        stopped=flags["stopped"],
        killed=flags["killed"],
        report=body,
    )


def _patch_embed(
    config: Path, *, model: str | None = None, fixed: bool = False, timeout_s: float | None = None
) -> dict[str, Any]:
    """Apply the embed settings to a written config; returns the embed stage as written."""
    import yaml

    body = yaml.safe_load(config.read_text())
    embed = next(s for s in body["stages"] if s["uses"] == "openai.embed")
    params = embed.setdefault("with", {})
    if model is not None:
        params["model"] = model
    if timeout_s is not None:
        params["request_timeout_s"] = timeout_s
    if fixed:
        embed.setdefault("pool", {})["adaptive"] = False
    config.write_text(yaml.safe_dump(body, sort_keys=False))
    return dict(embed)


@contextlib.contextmanager
def _run_folder(keep: bool) -> Iterator[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="adaptive-", dir=OUT))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


# -- reading the report ----------------------------------------------------------------------


def compact_trace(
    trace: Sequence[Sequence[float]],
    *,
    every_s: float = TRACE_EVERY_S,
    all_below: int = TRACE_ALL_BELOW,
) -> list[tuple[float, int]]:
    """Every change if there are fewer than `all_below`, else the limit every `every_s`
    seconds (the value in force then) and the last change."""
    points = [(float(t), int(limit)) for t, limit in trace]
    if len(points) < all_below or not points:
        return points
    out: list[tuple[float, int]] = []
    tick, i, current = 0.0, 0, points[0][1]
    end = points[-1][0]
    while tick <= end:
        while i < len(points) and points[i][0] <= tick:
            current = points[i][1]
            i += 1
        out.append((tick, current))
        tick += every_s
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def _embed_stage(report: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in report["stages"] if s["name"] == "embed")


def limit_summary(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The embed stage's concurrency numbers, its compact trace and when it hit the ceiling."""
    limit = stage.get("concurrency")
    if limit is None:
        return None
    trace = limit["trace"]
    at_ceiling = next((t for t, v in trace if v >= limit["ceiling"]), None)
    summary = {k: v for k, v in limit.items() if k != "trace"}
    summary["changes"] = len(trace) - 1
    summary["seconds_to_ceiling"] = at_ceiling
    summary["trace_compact"] = compact_trace(trace)
    return summary


def _stage_numbers(stage: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "workers",
        "items_done",
        "items_failed",
        "retries",
        "utilisation",
        "queue_full_share",
        "p50_batch_seconds",
        "p95_batch_seconds",
    )
    return {k: stage.get(k) for k in keys}


def _run_numbers(run: PipelineRun) -> dict[str, Any]:
    report = run.report or {}
    return {
        "exit_code": run.returncode,
        "stopped_at_deadline": run.stopped,
        "killed": run.killed,
        "process_wall_s": round(run.wall_s, 3),
        "run_s": report.get("wall_seconds"),
        "cpu_s": round(run.cpu_s, 2),
        "peak_anon_mb": round(run.peak_anon_mb, 1),
        "outcome": report.get("outcome"),
        "indexed": report.get("indexed"),
        "failed": report.get("failed"),
        "chunks": report.get("chunks"),
        "retries_by_reason": report.get("retries_by_reason"),
        "failures_by_reason": report.get("failures_by_reason"),
        "hints": report.get("hints", []),
        "notes": report.get("notes", []),
    }


# -- capacity: a server that computes a few requests at a time --------------------------------


@dataclass
class CapacityOptions:
    docs: int = 60
    pages: int = 3
    seed: int = 0
    per_text_ms: float = 50.0
    slots: int = 1
    fixed: bool = False
    timeout_s: float | None = None  # None: the stage's default
    max_run_s: float = 480.0
    keep: bool = False


def bench_capacity(opts: CapacityOptions) -> dict[str, Any]:
    """One run against a CapacityServer in this process; the server's counters and the
    run's numbers against the server's capacity time."""
    from tests.capacity_server import CapacityServer

    corpus = corpus_dir(opts.docs, opts.pages, opts.seed)
    per_text_s = opts.per_text_ms / 1000
    with (
        _run_folder(opts.keep) as folder,
        CapacityServer(slots=opts.slots, per_text_s=per_text_s) as server,
    ):
        config = write_config(folder, corpus, server.url, BenchOptions(docs=opts.docs))
        embed_cfg = _patch_embed(
            config, model="capacity-384", fixed=opts.fixed, timeout_s=opts.timeout_s
        )
        own_cpu = process_cpu_seconds(os.getpid())  # the server's threads live here
        busy = system_busy_seconds()
        run = run_pipeline(config, folder, max_s=opts.max_run_s)
        busy = system_busy_seconds() - busy
        own_cpu = process_cpu_seconds(os.getpid()) - own_cpu
        counters = {
            "requests": server.requests,
            "answered": server.answered,
            "abandoned": server.abandoned,
            "texts_computed": server.texts_computed,
            "max_queued": server.max_queued,
            "busy_seconds": round(server.busy_seconds, 2),
        }
        if run.report is None:
            tail = (folder / "run.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pipeline run exited {run.returncode} with no report:\n{tail}")
    report = run.report
    result = _run_numbers(run)
    chunks = int(report["chunks"])
    capacity_s = chunks * per_text_s / opts.slots
    run_s = float(report["wall_seconds"])
    requests = counters["requests"]
    embed = _embed_stage(report)
    result.update(
        kind="capacity",
        options=asdict(opts),
        embed_config={"pool": embed_cfg.get("pool"), "with": embed_cfg.get("with")},
        server=counters,
        capacity_s=round(capacity_s, 2),
        wall_over_capacity=round(run_s / capacity_s, 3) if capacity_s > 0 else None,
        process_wall_over_capacity=round(run.wall_s / capacity_s, 3) if capacity_s > 0 else None,
        abandoned_share=round(counters["abandoned"] / requests, 4) if requests else 0.0,
        texts_over_chunks=round(counters["texts_computed"] / chunks, 3) if chunks else None,
        wasted_texts=counters["texts_computed"] - chunks,
        server_busy_share=round(counters["busy_seconds"] / (run_s * opts.slots), 3)
        if run_s > 0
        else None,
        bench_cpu_s=round(own_cpu, 2),
        other_cpu_s=round(max(0.0, busy - run.cpu_s - own_cpu), 2),
        embed=_stage_numbers(embed),
        limit=limit_summary(embed),
    )
    return result


# -- scalable: a server whose latency does not grow with load ----------------------------------


@dataclass
class ScalableOptions:
    docs: int = 2400
    pages: int = 3
    seed: int = 0
    latency_ms: float = 300.0
    embed_workers: int = 8
    batch: int = 32
    fixed: bool = False
    max_run_s: float = 480.0
    keep: bool = False


def bench_scalable(opts: ScalableOptions) -> dict[str, Any]:
    """One run against the builtin server with a fixed latency: chunks/s against the bound."""
    corpus = corpus_dir(opts.docs, opts.pages, opts.seed)
    bench_opts = BenchOptions(
        docs=opts.docs,
        pages=opts.pages,
        seed=opts.seed,
        latency_ms=opts.latency_ms,
        embed_workers=opts.embed_workers,
        batch=opts.batch,
    )
    with (
        _run_folder(opts.keep) as folder,
        embedding_server(opts.latency_ms, log=folder / "server.log") as server,
    ):
        config = write_config(folder, corpus, server.url, bench_opts)
        embed_cfg = _patch_embed(config, fixed=opts.fixed)
        server_cpu = process_cpu_seconds(server.pid)
        busy = system_busy_seconds()
        run = run_pipeline(config, folder, max_s=opts.max_run_s)
        busy = system_busy_seconds() - busy
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
        if run.report is None:
            tail = (folder / "run.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pipeline run exited {run.returncode} with no report:\n{tail}")
    report = run.report
    result = _run_numbers(run)
    bound = opts.embed_workers * opts.batch / (opts.latency_ms / 1000)
    rate = float(report["chunks_per_s"])
    cores = len(os.sched_getaffinity(0))
    run_s = float(report["wall_seconds"])
    embed = _embed_stage(report)
    result.update(
        kind="scalable",
        options=asdict(opts),
        embed_config={"pool": embed_cfg.get("pool"), "with": embed_cfg.get("with")},
        chunks_per_s=rate,
        pages_per_s=report.get("pages_per_s"),
        bound_chunks_per_s=round(bound, 1),
        share_of_bound=round(rate / bound, 4),
        server_cpu_s=round(server_cpu, 2),
        machine_busy_s=round(busy, 2),
        machine_busy_share=round(busy / (run.wall_s * cores), 3) if run.wall_s > 0 else None,
        run_cpu_share=round((run.cpu_s + server_cpu) / (run_s * cores), 3) if run_s > 0 else None,
        other_cpu_s=round(max(0.0, busy - run.cpu_s - server_cpu), 2),
        embed=_stage_numbers(embed),
        limit=limit_summary(embed),
    )
    return result


# -- command line --------------------------------------------------------------------------


def _print_common(r: dict[str, Any]) -> None:
    stopped = " STOPPED at the deadline" if r["stopped_at_deadline"] else ""
    stopped += " and KILLED" if r["killed"] else ""
    print(
        f"  exit {r['exit_code']} ({r['outcome']}){stopped}: {r['indexed']} indexed, "
        f"{r['failed']} failed, "
        f"{r['chunks']} chunks; run {r['run_s']} s (process {r['process_wall_s']:.1f} s), "
        f"CPU {r['cpu_s']:.1f} s, peak RssAnon {r['peak_anon_mb']:.0f} MB"
    )
    if r["retries_by_reason"]:
        print(f"  retries: {r['retries_by_reason']}")
    if r["failures_by_reason"]:
        print(f"  failures: {r['failures_by_reason']}")
    e = r["embed"]
    print(
        f"  embed: x{e['workers']} done {e['items_done']} failed {e['items_failed']} "
        f"retries {e['retries']} utilisation {e['utilisation']} inbox full "
        f"{e['queue_full_share']} p50/p95 batch {e['p50_batch_seconds']}/{e['p95_batch_seconds']} s"
    )
    limit = r["limit"]
    if limit is None:
        print("  limit: fixed (not adaptive)")
    else:
        print(
            f"  limit: ceiling {limit['ceiling']} initial {limit['initial']} final "
            f"{limit['final']} lowest {limit['lowest']} highest {limit['highest']} mean "
            f"{limit['mean']} cuts {limit['overload_cuts']} changes {limit['changes']} "
            f"fastest call {limit['fastest_call_seconds']} s, at ceiling after "
            f"{limit['seconds_to_ceiling']} s"
        )
        print("  trace (s, limit): " + " ".join(f"{t:g}:{v}" for t, v in limit["trace_compact"]))
    for hint in r["hints"]:
        print(f"  hint: {hint}")
    for note in r["notes"]:
        print(f"  note: {note}")


def _print_capacity(r: dict[str, Any]) -> None:
    o, s = r["options"], r["server"]
    mode = "fixed pool" if o["fixed"] else "adaptive"
    print(
        f"capacity: {o['docs']} docs x {o['pages']} pages, {o['slots']} slot(s) x "
        f"{o['per_text_ms']:g} ms/text, {mode}, embed {r['embed_config']}"
    )
    _print_common(r)
    target = "yes" if (r["wall_over_capacity"] or 99) <= WALL_TARGET else "NO"
    print(
        f"  capacity time {r['capacity_s']} s; wall / capacity {r['wall_over_capacity']} "
        f"(process {r['process_wall_over_capacity']}; target <= {WALL_TARGET}: {target})"
    )
    target = "yes" if r["abandoned_share"] <= ABANDONED_TARGET else "NO"
    print(
        f"  server: {s['requests']} requests, {s['answered']} answered, {s['abandoned']} "
        f"abandoned ({r['abandoned_share']:.1%}; target <= {ABANDONED_TARGET:.0%}: {target}), "
        f"max queued {s['max_queued']}, busy {s['busy_seconds']} s "
        f"({r['server_busy_share']:.0%} of the run x slots)"
    )
    print(
        f"  texts computed {s['texts_computed']} for {r['chunks']} chunks "
        f"(x{r['texts_over_chunks']}, {r['wasted_texts']} wasted); CPU of this process "
        f"(the server) {r['bench_cpu_s']:.1f} s, other processes {r['other_cpu_s']:.1f} s"
    )


def _print_scalable(r: dict[str, Any]) -> None:
    o = r["options"]
    mode = "fixed pool" if o["fixed"] else "adaptive"
    print(
        f"scalable: {o['docs']} docs x {o['pages']} pages, latency {o['latency_ms']:g} ms, "
        f"{mode}, embed {r['embed_config']}"
    )
    _print_common(r)
    target = "yes" if r["share_of_bound"] >= SHARE_TARGET else "NO"
    print(
        f"  {r['chunks_per_s']:.1f} chunks/s ({r['pages_per_s']} pages/s) of the bound "
        f"{r['bound_chunks_per_s']:.0f} (pool x batch / latency): {r['share_of_bound']:.1%} "
        f"(target >= {SHARE_TARGET:.0%}: {target})"
    )
    print(
        f"  CPU: run {r['cpu_s']:.1f} s + server {r['server_cpu_s']:.1f} s = "
        f"{r['run_cpu_share']:.0%} of the cores over the run; machine busy "
        f"{r['machine_busy_share']:.0%} over the process wall (other processes: "
        f"{r['other_cpu_s']:.1f} CPU s)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--docs", type=int, required=True)
        q.add_argument("--pages", type=int, default=3)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--fixed", action="store_true", help="pool.adaptive: false")
        q.add_argument(
            "--max-run-s", type=float, default=480.0, help="stop the run past this (default 480)"
        )
        q.add_argument("--keep", action="store_true", help="keep the run folder under bench/out/")
        q.add_argument("--json", type=Path, help="also write the results here")

    c = sub.add_parser("capacity", help="a server computing --slots requests at a time")
    common(c)
    c.add_argument("--per-text-ms", type=float, required=True)
    c.add_argument("--slots", type=int, default=1)
    c.add_argument("--timeout-s", type=float, help="request_timeout_s (default: the stage's)")

    s = sub.add_parser("scalable", help="the builtin server with a fixed latency")
    common(s)
    s.add_argument("--latency-ms", type=float, required=True)
    s.add_argument("--embed-workers", type=int, required=True, help="embed pool size")
    s.add_argument("--batch", type=int, required=True, help="texts per embedding request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results: dict[str, Any] = {"machine": machine()}
    if args.command == "capacity":
        run = bench_capacity(
            CapacityOptions(
                docs=args.docs,
                pages=args.pages,
                seed=args.seed,
                per_text_ms=args.per_text_ms,
                slots=args.slots,
                fixed=args.fixed,
                timeout_s=args.timeout_s,
                max_run_s=args.max_run_s,
                keep=args.keep,
            )
        )
        _print_capacity(run)
    else:
        run = bench_scalable(
            ScalableOptions(
                docs=args.docs,
                pages=args.pages,
                seed=args.seed,
                latency_ms=args.latency_ms,
                embed_workers=args.embed_workers,
                batch=args.batch,
                fixed=args.fixed,
                max_run_s=args.max_run_s,
                keep=args.keep,
            )
        )
        _print_scalable(run)
    results[args.command] = run
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
