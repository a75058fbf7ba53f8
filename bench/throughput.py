"""Throughput and peak memory of a real `pipeline run` over a generated corpus.

    python -m bench.throughput --docs 1000 --pages 3 --latency-ms 0
    python -m bench.throughput --docs 1000 --pages 3 --mode pypdf      # the baseline
    python -m bench.throughput --docs 1000 --pages 3 --mode both       # both, and the ratio

What runs is the real thing, in processes of its own, as a user would run it:

- the builtin embedding server, `python -m pipeline serve-embeddings --port P
  --latency-ms L`, in a subprocess (it stands in for a remote API, so its memory
  is not counted; its CPU is reported, because on this machine it shares the cores);
- `python -m pipeline run -c CONFIG --no-progress --report REPORT`, where CONFIG
  is the repository's pipeline.yaml with the paths pointed into a temporary
  folder and the options below applied.

While the run goes, a sampler reads /proc/<pid>/status of the run process and
all its descendants (the forkserver, the extraction workers) every 0.2 s and keeps
the peak of the summed VmRSS and of the summed RssAnon. RssAnon is the number to
watch: it is the heap, what grows with the corpus if something is kept; file-backed
RSS (the memory-mapped Edge store, shared libraries) can be dropped by the kernel.
Sampling is measurement only: nothing waits on it.

The "bare pypdf" baseline (`--mode pypdf`) is the floor of what extraction costs:
a multiprocessing pool with as many workers as the pipeline's extraction pool,
each doing `PdfReader(...)` and `page.extract_text()` for every page, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pipeline.cpu import busy_seconds
from pipeline.process_name import comm_name

__all__ = [
    "RATIO_TARGET",
    "ROOT",
    "BenchOptions",
    "TreeSampler",
    "bare_pypdf",
    "bench_pipeline",
    "corpus_dir",
    "embedding_server",
    "machine",
    "process_cpu_seconds",
]

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
OUT = ROOT / "bench" / "out"  # ignored by git: corpora and kept runs
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc sampling ----------------------------------------------------------------------


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in kB of one process, or None once it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return rss, anon


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds so far, command name) of one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK, name


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, from /proc/stat).

    Compared with a run's own CPU this shows load from outside the measured
    processes (another test run on the same cores would skew the numbers). The
    engine reads the same counters for its end-of-run hint (`pipeline.cpu`).
    """
    return busy_seconds() or 0.0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (0 if it is gone)."""
    found = _stat(pid)
    return found[1] if found is not None else 0.0


def _descendants(root: int) -> dict[int, tuple[float, str]]:
    """`root` and every process below it: pid -> (CPU seconds, name)."""
    parents: dict[int, list[int]] = {}
    info: dict[int, tuple[float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        found = _stat(int(entry))
        if found is None:
            continue
        parents.setdefault(found[0], []).append(int(entry))
        info[int(entry)] = (found[1], found[2])
    out: dict[int, tuple[float, str]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            out[pid] = info[pid]
        todo.extend(parents.get(pid, ()))
    return out


@dataclass
class TreeSample:
    rss_kb: int
    anon_kb: int
    by_process: dict[str, int]  # "name[pid]" -> RssAnon kB


@dataclass
class TreeSampler:
    """Samples a process tree's memory on a background thread: `with TreeSampler(pid):`.

    Peaks are of the sums over the tree at one instant. CPU is the sum over every
    process seen of its last sampled CPU time, so a process that lived less than
    one interval may be missed; `wait4`'s rusage (see `run_measured`) is exact.
    """

    pid: int
    interval_s: float = 0.2
    peak_rss_kb: int = 0
    peak_anon_kb: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    max_processes: int = 0
    _cpu: dict[int, float] = field(default_factory=dict)
    _names: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> TreeSample | None:
        tree = _descendants(self.pid)
        if not tree:
            return None
        rss = anon = 0
        by_process: dict[str, int] = {}
        for pid, (cpu, name) in tree.items():
            self._cpu[pid] = cpu
            self._names[pid] = name
            kb = _status_kb(pid)
            if kb is None:
                continue
            rss += kb[0]
            anon += kb[1]
            by_process[f"{name}[{pid}]"] = kb[1]
        self.samples += 1
        self.max_processes = max(self.max_processes, len(tree))
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        if anon > self.peak_anon_kb:
            self.peak_anon_kb = anon
            self.at_peak = by_process
        return TreeSample(rss, anon, by_process)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def cpu_by_process(self) -> dict[str, float]:
        """Last sampled CPU seconds of every process seen, as "name[pid]"."""
        return {f"{self._names[pid]}[{pid}]": round(cpu, 2) for pid, cpu in self._cpu.items()}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Measured:
    """One measured subprocess: exit code, wall time, CPU, peak memory of its tree."""

    returncode: int
    wall_s: float
    cpu_s: float  # rusage of the process and the descendants it waited for
    peak_rss_mb: float
    peak_anon_mb: float
    anon_at_peak_mb: dict[str, float]
    cpu_by_process: dict[str, float]
    processes: int
    machine_busy_s: float  # every CPU second the machine spent during the run
    main_cpu_s: float  # the run's own process alone, read from /proc after it exited


def run_measured(
    cmd: Sequence[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Measured:
    """Run `cmd` to the end with its output in `log`, sampling its process tree."""
    with log.open("wb") as out:
        busy = system_busy_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        with TreeSampler(proc.pid) as sampler:
            try:
                # Wait for the exit without reaping: a zombie's /proc/PID/stat still
                # holds its final CPU time, the main process's own, children apart.
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                main_cpu = process_cpu_seconds(proc.pid)
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        wall = time.perf_counter() - started
        busy = system_busy_seconds() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=max(usage.ru_utime + usage.ru_stime, sampler.cpu_seconds),
        peak_rss_mb=sampler.peak_rss_kb / 1024,
        peak_anon_mb=sampler.peak_anon_kb / 1024,
        anon_at_peak_mb={k: round(v / 1024, 1) for k, v in sampler.at_peak.items()},
        cpu_by_process=sampler.cpu_by_process(),
        processes=sampler.max_processes,
        machine_busy_s=busy,
        main_cpu_s=main_cpu,
    )


# -- the embedding server ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def embedding_server(
    latency_ms: float,
    *,
    log: Path | None = None,
    model: str | None = None,
    served_name: str | None = None,
) -> Iterator[Server]:
    """The builtin embedding server in a subprocess, serving the hash model or `model`;
    yields once /health answers (a local model takes a few seconds to load)."""
    port = _free_port()
    cmd = [
        str(PYTHON),
        "-m",
        "pipeline",
        "serve-embeddings",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
    ]
    cmd += ["--model", model] if model is not None else []
    cmd += ["--served-name", served_name] if served_name is not None else []
    sink = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedding server did not start: {cmd}") from None
                time.sleep(0.1)  # waiting for a subprocess to listen: nothing to join on
        yield Server(url=f"http://127.0.0.1:{port}/v1", pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None and not isinstance(sink, int):
            sink.close()


# -- corpus, config, machine ---------------------------------------------------------------


def corpus_dir(docs: int, pages: int, seed: int = 0) -> Path:
    """The cached corpus for these arguments under bench/out/, generated if needed."""
    from bench.corpus import ensure_corpus

    return ensure_corpus(OUT / f"corpus-{docs}x{pages}-s{seed}", docs=docs, pages=pages, seed=seed)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "pipeline", "stages", "pipeline.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "commit": commit + ("+dirty(pipeline/stages)" if dirty else ""),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class BenchOptions:
    docs: int = 1000
    pages: int = 3
    seed: int = 0
    latency_ms: float = 0.0
    embed_workers: int | None = None  # None: as in pipeline.yaml
    batch: int | None = None
    embed_queue: int | None = None  # in batches; None: as in pipeline.yaml (unset: 2 x workers)
    # False: embed in the engine's process, and so the store a stage of its own
    # (pipeline.fusion); None: as in pipeline.yaml (its own process, the store in it)
    embed_own_process: bool | None = None
    extract_workers: int | None = None  # None: as in pipeline.yaml ("auto")
    extractor: str = "pypdf"  # pdf.extract's engine: pypdf or pdfium
    model: str = "hash-384"  # what the embedding server serves
    executor: str = "local"  # or "ray": a local Ray instance started by the run
    engine: str = "edge"
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    store_batch: int | None = None
    store_queue: int | None = None
    keep: bool = False


def write_config(folder: Path, corpus: Path, url: str, opts: BenchOptions) -> Path:
    """pipeline.yaml with the source, state and store in `folder` and `opts` applied."""
    import yaml

    config = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    config["source"] = {**config.get("source", {}), "path": str(corpus)}
    config["executor"] = opts.executor
    config["state"] = str(folder / "state.db")
    for stage in config["stages"]:
        params = stage.setdefault("with", {})
        pool = stage.setdefault("pool", {})
        if stage["uses"] == "pdf.extract":
            params["engine"] = opts.extractor
            if opts.extract_workers is not None:
                pool["size"] = opts.extract_workers
        elif stage["uses"] == "text.chunk":
            if opts.chunk_size is not None:
                params["size"] = opts.chunk_size
            if opts.chunk_overlap is not None:
                params["overlap"] = opts.chunk_overlap
        elif stage["uses"] == "openai.embed":
            params["url"] = url
            params["model"] = opts.model
            if opts.embed_workers is not None:
                pool["size"] = opts.embed_workers
            if opts.batch is not None:
                params["batch"] = opts.batch
            if opts.embed_queue is not None:
                stage["queue"] = opts.embed_queue
            if opts.embed_own_process is not None:
                pool["own_process"] = opts.embed_own_process
        elif stage["uses"] == "qdrant.upsert":
            params["path"] = str(folder / "qdrant")
            params["engine"] = opts.engine
            if opts.store_batch is not None:
                params["batch"] = opts.store_batch
            if opts.store_queue is not None:
                stage["queue"] = opts.store_queue
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _store_params(config: Path) -> dict[str, Any]:
    import yaml

    for stage in yaml.safe_load(config.read_text())["stages"]:
        if stage["uses"] == "qdrant.upsert":
            return dict(stage["with"])
    raise LookupError("no qdrant.upsert stage")


_REOPEN = """
import json, resource, sys, time
started = time.perf_counter()
from stages.qdrant import Upsert
imported = time.perf_counter()
store = Upsert(json.loads(sys.argv[1]), name="store")
store.open()
points = store.count()
counted = time.perf_counter()
store.close()
closed = time.perf_counter()
anon = 0
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1])
print(json.dumps({
    "import_s": imported - started,
    "open_count_s": counted - imported,
    "close_s": closed - counted,
    "points": points,
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "anon_after_mb": anon / 1024,
}))
"""


def reopen(config: Path) -> dict[str, Any]:
    """Open the run's store in a fresh process and count its points, timed."""
    params = _store_params(config)
    done = subprocess.run(
        [str(PYTHON), "-c", _REOPEN, json.dumps(params)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the benches ---------------------------------------------------------------------------


def bench_pipeline(
    opts: BenchOptions, *, server: Server | None = None, measure_reopen: bool = False
) -> dict[str, Any]:
    """One `pipeline run` over the corpus; returns rates, memory and the report.

    Starts its own embedding server unless `server` is given (the peer bench shares
    one between runs). The temporary folder is removed unless `opts.keep`.
    """
    corpus = corpus_dir(opts.docs, opts.pages, opts.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    try:
        with contextlib.ExitStack() as stack:
            if server is None:
                server = stack.enter_context(
                    embedding_server(opts.latency_ms, log=folder / "server.log")
                )
            config = write_config(folder, corpus, server.url, opts)
            _compile_project()
            report = folder / "report.json"
            cmd = [str(PYTHON), "-m", "pipeline", "run", "-c", str(config), "--no-progress"]
            cmd += ["--report", str(report)]
            server_cpu = process_cpu_seconds(server.pid)
            measured = run_measured(cmd, log=folder / "run.log")
            server_cpu = process_cpu_seconds(server.pid) - server_cpu
        if measured.returncode != 0 or not report.is_file():
            tail = (folder / "run.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pipeline run exited {measured.returncode}:\n{tail}")
        body = json.loads(report.read_text())
        result = _pipeline_result(opts, body, measured, server_cpu)
        result["config"] = str(config) if opts.keep else None
        if measure_reopen:
            result["reopen"] = reopen(config)
        return result
    finally:
        if opts.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _compile_project() -> None:
    """Write the project's bytecode, as an installed package has it: where
    PYTHONDONTWRITEBYTECODE is set (this VM sets it), every run would otherwise
    compile ~40 modules again (~70 ms of the engine's process)."""
    subprocess.run(
        [str(PYTHON), "-m", "compileall", "-q", "pipeline", "stages"], cwd=ROOT, check=True
    )


def _pipeline_result(
    opts: BenchOptions, report: dict[str, Any], measured: Measured, server_cpu: float
) -> dict[str, Any]:
    seconds = float(report["seconds"])
    pages = report["indexed"] * opts.pages
    embed = next((s for s in report["stages"] if s["name"] == "embed"), None)
    batch = opts.batch or _yaml_batch()
    bound = None
    if opts.latency_ms > 0 and embed is not None:
        bound = embed["workers"] * batch / (opts.latency_ms / 1000)
    counters = embed.get("counters", {}) if embed is not None else {}
    requests = sum(n for key, n in counters.items() if key.startswith("embedding_requests:"))
    chunks = max(1, int(report["chunks"]))
    # Process-pool workers name themselves "<stage> worker" (pipeline.process_name).
    workers = {comm_name(f"{s['name']} worker") for s in report["stages"] if s["pool"] == "process"}
    worker_cpu = 0.0
    singles: dict[str, float] = {}  # a named process of which a run has one: embed, Edge
    for key, cpu in measured.cpu_by_process.items():
        name = key.rpartition("[")[0]
        if name in workers:
            worker_cpu += cpu
        elif name != "python":  # the run itself (counted apart) and the forkserver
            singles[name] = singles.get(name, 0.0) + cpu  # a restarted child adds up
    return {
        "kind": "pipeline",
        "options": asdict(opts),
        "indexed": report["indexed"],
        "failed": report["failed"],
        "chunks": report["chunks"],
        "pages": pages,
        "run_s": seconds,
        "wall_s": measured.wall_s,
        "docs_per_s": report["indexed"] / seconds,
        "pages_per_s": pages / seconds,
        "chunks_per_s": report["chunks"] / seconds,
        "chunks_per_s_bound": bound,
        "cpu_s": measured.cpu_s,
        "main_cpu_s": measured.main_cpu_s,
        "worker_cpu_s": worker_cpu,
        "single_cpu_s": singles,
        "main_ms_per_1000_chunks": 1e6 * measured.main_cpu_s / chunks,
        "embed_requests": requests,
        "embed_requests_least": -(-chunks // batch),
        "server_cpu_s": server_cpu,
        "peak_rss_mb": measured.peak_rss_mb,
        "peak_anon_mb": measured.peak_anon_mb,
        "anon_at_peak_mb": measured.anon_at_peak_mb,
        "cpu_by_process": measured.cpu_by_process,
        "other_cpu_s": max(0.0, measured.machine_busy_s - measured.cpu_s - server_cpu),
        "processes": measured.processes,
        "stages": report["stages"],
        "hints": report.get("hints", []),
    }


def _yaml_batch() -> int:
    import yaml

    for stage in yaml.safe_load((ROOT / "pipeline.yaml").read_text())["stages"]:
        if stage["uses"] == "openai.embed":
            return int(stage.get("with", {}).get("batch", 64))
    return 64


def _extract_file(path: str) -> tuple[int, int]:
    """Bare pypdf on one file: (pages, characters)."""
    from pypdf import PdfReader

    reader = PdfReader(BytesIO(Path(path).read_bytes()))
    chars = 0
    for page in reader.pages:
        chars += len(page.extract_text())
    return len(reader.pages), chars


def _extract_file_pdfium(path: str) -> tuple[int, int]:
    """Bare PDFium on one file: (pages, characters)."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(Path(path).read_bytes())
    chars = 0
    for index in range(len(document)):
        chars += len(document[index].get_textpage().get_text_range())
    pages = len(document)
    document.close()
    return pages, chars


def _quiet_pypdf() -> None:
    import logging

    import pypdf  # noqa: F401 - imported before the clock starts, as the pipeline's workers do

    logging.getLogger("pypdf").setLevel(logging.ERROR)


def bare_pypdf(corpus: Path, *, workers: int, extractor: str = "pypdf") -> dict[str, Any]:
    """Pages/s of `workers` processes doing nothing but read each page's text
    (PdfReader + extract_text, or PDFium's get_text_range)."""
    files = sorted(str(p) for p in corpus.glob("*.pdf"))
    one = _extract_file_pdfium if extractor == "pdfium" else _extract_file
    started = time.perf_counter()
    pages = chars = 0
    with get_context("fork").Pool(workers, initializer=_quiet_pypdf) as pool:
        for n, c in pool.imap_unordered(one, files, chunksize=4):
            pages += n
            chars += c
    seconds = time.perf_counter() - started
    return {
        "kind": extractor,
        "workers": workers,
        "docs": len(files),
        "pages": pages,
        "chars": chars,
        "seconds": seconds,
        "pages_per_s": pages / seconds,
    }


RATIO_TARGET = 0.85  # issue 9: pages/s at least 85% of bare pypdf's


def _beside_extraction(bare: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """CPU microseconds per chunk: bare's extraction (its processes, busy all its run);
    the pipeline's extraction workers (chunking fused into them included; 0 if they
    cannot be told apart), its other processes, the embedding server and the rest of
    the machine; and the most all of these may take for the pipeline to reach
    `RATIO_TARGET` of bare. With every core busy in both runs, the ratio is bare's CPU
    against all the CPU the pipeline's run spent, so the allowance holds on any number
    of cores if the extraction pool is sized to them (pool.size: auto)."""
    per_chunk = 1e6 / max(1, run["chunks"])
    bare_cpu = bare["seconds"] * bare["workers"]
    return {
        "bare": bare_cpu * per_chunk,
        "workers": run["worker_cpu_s"] * per_chunk,
        "others": (run["cpu_s"] - run["worker_cpu_s"]) * per_chunk,
        "server": run["server_cpu_s"] * per_chunk,
        "rest": run["other_cpu_s"] * per_chunk,
        "allowed": bare_cpu / RATIO_TARGET * per_chunk,
    }


# -- command line --------------------------------------------------------------------------


def _print_pipeline(r: dict[str, Any]) -> None:
    o = r["options"]
    print(
        f"pipeline: {r['indexed']} docs ({r['failed']} failed), {r['pages']} pages, "
        f"{r['chunks']} chunks | latency {o['latency_ms']:g} ms, engine {o['engine']}"
    )
    print(
        f"  run {r['run_s']:.2f} s (wall {r['wall_s']:.2f} s): {r['docs_per_s']:.1f} docs/s, "
        f"{r['pages_per_s']:.1f} pages/s, {r['chunks_per_s']:.1f} chunks/s"
    )
    if r["chunks_per_s_bound"]:
        share = r["chunks_per_s"] / r["chunks_per_s_bound"]
        print(
            f"  embed bound workers x batch / latency = {r['chunks_per_s_bound']:.0f} chunks/s;"
            f" reached {share:.0%}"
        )
    print(
        f"  peak memory of {r['processes']} processes: VmRSS {r['peak_rss_mb']:.0f} MB, "
        f"RssAnon {r['peak_anon_mb']:.0f} MB; CPU {r['cpu_s']:.1f} s "
        f"(+ embedding server {r['server_cpu_s']:.1f} s; anything else "
        f"{r['other_cpu_s']:.1f} s)"
    )
    print(
        "  CPU s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_by_process"].items())
    )
    main_ms = r["main_ms_per_1000_chunks"]
    print(
        f"  main process: {r['main_cpu_s']:.2f} CPU s = {main_ms:.0f} ms per 1,000 chunks "
        f"(a ceiling of {1e6 / main_ms if main_ms else float('inf'):,.0f} chunks/s on any number "
        f"of cores); embedding requests {r['embed_requests']} for at least "
        f"{r['embed_requests_least']} ({r['embed_requests'] / r['embed_requests_least']:.2f}x)"
    )
    if r["single_cpu_s"]:
        per_chunk = {
            name: 1e6 * cpu / max(1, r["chunks"]) for name, cpu in r["single_cpu_s"].items()
        }
        print(
            "  processes the run has one of, each a ceiling like the main process: "
            + ", ".join(
                f"{name} {us:.0f} us a chunk (at most {1e6 / us if us else float('inf'):,.0f}"
                " chunks/s)"
                for name, us in per_chunk.items()
            )
        )
    for s in r["stages"]:
        full, host = s.get("queue_full_share"), s.get("fused_into")
        where = ""
        if host:  # a fused stage: no queue of its own
            where = f"  in {host}'s calls"
        elif full is not None:
            where = f"  inbox full {full:.0%} of the run"
        print(
            f"  {s['name']:8} {s['pool']:7} x{s['workers']:<3} done {s['items_done']:>7} "
            f"busy {s['busy_seconds']:8.1f} s  utilisation {s['utilisation']:.2f}{where}"
        )
    for hint in r.get("hints", []):
        print(f"  hint: {hint}")
    if r.get("reopen"):
        ro = r["reopen"]
        print(
            f"  reopen: {ro['points']} points, open+count {ro['open_count_s']:.3f} s "
            f"(import {ro['import_s']:.2f} s), max RSS {ro['max_rss_mb']:.0f} MB"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--pages", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--embed-workers", type=int, help="embed pool size (pipeline.yaml: 64)")
    p.add_argument("--batch", type=int, help="texts per embedding request (pipeline.yaml: 64)")
    p.add_argument("--embed-queue", type=int, help="embed's queue: batches (default 2 x pool)")
    p.add_argument(
        "--workers",
        "--extract-workers",
        dest="extract_workers",
        type=int,
        help="extract pool size, and the bare baseline's processes (default: CPU count)",
    )
    p.add_argument("--engine", choices=("edge", "qdrant-client"), default="edge")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--chunk-size", type=int, help="text.chunk size in characters")
    p.add_argument("--chunk-overlap", type=int, help="text.chunk overlap in characters")
    p.add_argument(
        "--embed-in-engine",
        action="store_true",
        help="embed in the engine's process (own_process: false): the store is its own stage",
    )
    p.add_argument(
        "--store-batch", type=int, help="points per upsert, with --embed-in-engine (default 256)"
    )
    p.add_argument(
        "--store-queue", type=int, help="store's queue in batches, with --embed-in-engine"
    )
    p.add_argument("--reopen", action="store_true", help="also time reopening the store")
    p.add_argument("--mode", choices=("pipeline", "pypdf", "both"), default="pipeline")
    p.add_argument(
        "--extractor",
        choices=("pypdf", "pdfium"),
        default="pypdf",
        help="pdf.extract's engine, and the bare baseline's (--mode pypdf and both)",
    )
    p.add_argument("--keep", action="store_true", help="keep the run folder under bench/out/")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = BenchOptions(
        docs=args.docs,
        pages=args.pages,
        seed=args.seed,
        latency_ms=args.latency_ms,
        embed_workers=args.embed_workers,
        batch=args.batch,
        embed_queue=args.embed_queue,
        embed_own_process=False if args.embed_in_engine else None,
        extract_workers=args.extract_workers,
        extractor=args.extractor,
        engine=args.engine,
        executor=args.executor,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        store_batch=args.store_batch,
        store_queue=args.store_queue,
        keep=args.keep,
    )
    results: dict[str, Any] = {"machine": machine()}
    corpus = corpus_dir(opts.docs, opts.pages, opts.seed)
    if args.mode in ("pypdf", "both"):
        workers = opts.extract_workers or len(os.sched_getaffinity(0))
        base = bare_pypdf(corpus, workers=workers, extractor=opts.extractor)
        results["pypdf"] = base
        print(
            f"bare {opts.extractor}: {base['pages']} pages with {workers} processes in "
            f"{base['seconds']:.2f} s: {base['pages_per_s']:.1f} pages/s"
        )
    if args.mode in ("pipeline", "both"):
        run = bench_pipeline(opts, measure_reopen=args.reopen)
        results["pipeline"] = run
        _print_pipeline(run)
    if args.mode == "both":
        ratio = results["pipeline"]["pages_per_s"] / results["pypdf"]["pages_per_s"]
        wall = results["pipeline"]["pages"] / results["pipeline"]["wall_s"]
        wall_ratio = wall / results["pypdf"]["pages_per_s"]
        beside = _beside_extraction(results["pypdf"], results["pipeline"])
        # Were everything of the run's own beside extraction free, the embedding server
        # and the rest of the machine would still take their CPU from extraction's.
        cap = beside["bare"] / (beside["bare"] + beside["server"] + beside["rest"])
        results["ratio"] = {"run": ratio, "wall": wall_ratio, "cap": cap}
        results["cpu_us_per_chunk"] = beside
        print(
            f"pipeline / bare {opts.extractor}: {ratio:.0%} (run time), "
            f"{wall_ratio:.0%} (wall time); at most {cap:.0%} on this machine with the "
            "embedding server's CPU and the rest of the machine's beside extraction"
        )
        spent = beside["workers"] + beside["others"] + beside["server"] + beside["rest"]
        print(
            f"  CPU per chunk: extraction workers {beside['workers']:.0f} us (bare "
            f"{beside['bare']:.0f} us), the run's other processes {beside['others']:.0f} us, "
            f"the embedding server {beside['server']:.0f} us, the rest of the machine "
            f"{beside['rest']:.0f} us: {spent:.0f} us, where {RATIO_TARGET:.0%} of bare allows "
            f"{beside['allowed']:.0f} us (on any number of cores, extraction having them all)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
