"""Our pipeline against the recipe most users pick today: LlamaIndex's stock ingestion.

    python -m bench.llamaindex_peer --docs 1000 --pages 3 --latency-ms 50 300 --rounds 2

Theirs, as the LlamaIndex docs show it, nothing tuned but the batch size:

    SimpleDirectoryReader(corpus).load_data()               # PDFReader: pypdf, a Document a page
    IngestionPipeline(transformations=[
        SentenceSplitter(chunk_size=512, chunk_overlap=64),  # tokens (tiktoken cl100k)
        OpenAIEmbedding(model="text-embedding-3-small", api_base=<our server>, api_key="x",
                        embed_batch_size=64),
    ], vector_store=QdrantVectorStore(client=QdrantClient(path=...), collection_name=...)).run(...)

Ours: `pipeline run` with pipeline.yaml's stages, text.chunk at 2048/256 characters
(~4 characters a token, so the same 512/64 tokens) and the same 64-text batches.

Both talk to the same builtin embedding server (one subprocess per latency, shared
by all runs at that latency) and index the same generated corpus; runs alternate
ours, theirs, ours, theirs in one session so drift on the machine hits both.
Each run is a fresh process measured the same way (wall time, and the peak summed
VmRSS / RssAnon of its process tree, sampled every 0.2 s by bench.throughput).

LlamaIndex lives in its own virtualenv, bench/.peer-venv, made from
bench/requirements-peer.txt (see bench/README.md); it is never installed into the
project's .venv. This file runs in both: the orchestrator in the project's venv,
`--worker` in the peer's, so it imports nothing but the standard library at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.throughput import Server

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / "bench" / ".peer-venv" / "bin" / "python"
COLLECTION = "documents"
PEER_MODEL = "text-embedding-3-small"  # a name OpenAIEmbedding accepts; the hash model answers


# -- the worker: runs inside bench/.peer-venv ----------------------------------------------


def _tiktoken_cache() -> str:
    """llama-index-core's bundled tiktoken files, so SentenceSplitter works offline."""
    import importlib.util

    spec = importlib.util.find_spec("llama_index.core")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-index-core is not installed in this interpreter")
    return str(Path(next(iter(spec.submodule_search_locations))) / "_static" / "tiktoken_cache")


def worker(
    corpus: Path, out: Path, *, url: str, batch: int, chunk_tokens: int, overlap: int
) -> dict[str, Any]:
    """LlamaIndex's stock recipe over `corpus` into a local Qdrant at `out`; timings."""
    started = time.perf_counter()
    os.environ["TIKTOKEN_CACHE_DIR"] = _tiktoken_cache()
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    imported = time.perf_counter()
    documents = SimpleDirectoryReader(input_dir=str(corpus), required_exts=[".pdf"]).load_data()
    loaded = time.perf_counter()
    client = QdrantClient(path=str(out / "qdrant"))
    store = QdrantVectorStore(client=client, collection_name=COLLECTION)
    pipeline = IngestionPipeline(
        transformations=[
            SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=overlap),
            # The model name passes OpenAIEmbedding's check; the server answers to it
            # (`serve-embeddings --served-name`).
            OpenAIEmbedding(
                model=PEER_MODEL,
                api_base=url,
                api_key="x",
                embed_batch_size=batch,
            ),
        ],
        vector_store=store,
    )
    nodes = pipeline.run(documents=documents)
    ingested = time.perf_counter()
    points = client.count(COLLECTION).count
    client.close()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "ingest_s": ingested - loaded,
        "work_s": ingested - imported,
        "documents": len(documents),
        "nodes": len(nodes),
        "points": points,
    }


# -- the orchestrator: runs in the project's venv -------------------------------------------


def run_theirs(
    corpus: Path, *, url: str, batch: int, chunk_tokens: int, overlap: int, server_pid: int
) -> dict[str, Any]:
    from bench.throughput import OUT, process_cpu_seconds, run_measured

    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="peer-", dir=OUT))
    try:
        result_file = folder / "result.json"
        cmd = [str(PEER_PYTHON), "-m", "bench.llamaindex_peer", "--worker"]
        cmd += ["--corpus", str(corpus), "--out", str(folder), "--url", url]
        cmd += ["--batch", str(batch), "--chunk-tokens", str(chunk_tokens)]
        cmd += ["--overlap-tokens", str(overlap), "--result", str(result_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        server_cpu = process_cpu_seconds(server_pid)
        measured = run_measured(cmd, log=folder / "run.log", env=env)
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        if measured.returncode != 0 or not result_file.is_file():
            tail = (folder / "run.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"LlamaIndex worker exited {measured.returncode}:\n{tail}")
        inner = json.loads(result_file.read_text())
        return {
            "kind": "llamaindex",
            "wall_s": measured.wall_s,
            "work_s": inner["work_s"],
            "chunks": inner["points"],
            "peak_rss_mb": measured.peak_rss_mb,
            "peak_anon_mb": measured.peak_anon_mb,
            "cpu_s": measured.cpu_s,
            "server_cpu_s": server_cpu,
            "other_cpu_s": max(0.0, measured.machine_busy_s - measured.cpu_s - server_cpu),
            "detail": inner,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_ours(
    docs: int,
    pages: int,
    *,
    seed: int,
    server: Server,
    latency_ms: float,
    batch: int,
    size: int,
    overlap: int,
) -> dict[str, Any]:
    from bench.throughput import BenchOptions, bench_pipeline

    opts = BenchOptions(
        model=PEER_MODEL,
        docs=docs,
        pages=pages,
        seed=seed,
        latency_ms=latency_ms,
        batch=batch,
        chunk_size=size,
        chunk_overlap=overlap,
    )
    r = bench_pipeline(opts, server=server)
    return {
        "kind": "ours",
        "wall_s": r["wall_s"],
        "work_s": r["run_s"],
        "chunks": r["chunks"],
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_anon_mb": r["peak_anon_mb"],
        "cpu_s": r["cpu_s"],
        "server_cpu_s": r["server_cpu_s"],
        "other_cpu_s": r["other_cpu_s"],
        "stages": r["stages"],
    }


def _row(latency: float, r: dict[str, Any]) -> str:
    return (
        f"{latency:>5g} ms  {r['kind']:10} wall {r['wall_s']:7.2f} s  work {r['work_s']:7.2f} s  "
        f"chunks {r['chunks']:6}  RSS {r['peak_rss_mb']:6.0f} MB  anon {r['peak_anon_mb']:6.0f} MB"
        f"  CPU {r['cpu_s']:6.1f} s (+server {r['server_cpu_s']:.1f} s,"
        f" other {r['other_cpu_s']:.1f} s)"
    )


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from bench.throughput import corpus_dir, embedding_server, machine

    corpus = corpus_dir(args.docs, args.pages, args.seed)
    out: dict[str, Any] = {"machine": machine(), "docs": args.docs, "pages": args.pages}
    for latency in args.latency_ms:
        runs: list[dict[str, Any]] = []
        with embedding_server(latency, served_name=PEER_MODEL) as server:
            for _ in range(args.rounds):
                ours = run_ours(
                    args.docs,
                    args.pages,
                    seed=args.seed,
                    server=server,
                    latency_ms=latency,
                    batch=args.batch,
                    size=args.chunk_chars,
                    overlap=args.overlap_chars,
                )
                print(_row(latency, ours), flush=True)
                theirs = run_theirs(
                    corpus,
                    url=server.url,
                    batch=args.batch,
                    chunk_tokens=args.chunk_tokens,
                    overlap=args.overlap_tokens,
                    server_pid=server.pid,
                )
                print(_row(latency, theirs), flush=True)
                runs += [ours, theirs]
        out[f"{latency:g}ms"] = runs
        _summary(latency, runs)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _summary(latency: float, runs: list[dict[str, Any]]) -> None:
    def med(kind: str, key: str) -> float:
        return _median([r[key] for r in runs if r["kind"] == kind])

    wall = med("llamaindex", "wall_s") / med("ours", "wall_s")
    rss = med("llamaindex", "peak_rss_mb") / med("ours", "peak_rss_mb")
    anon = med("llamaindex", "peak_anon_mb") / med("ours", "peak_anon_mb")
    print(
        f"{latency:>5g} ms  medians: LlamaIndex takes {wall:.1f}x our wall time, "
        f"{rss:.1f}x our peak VmRSS, {anon:.1f}x our peak RssAnon",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llamaindex_peer", description=__doc__)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--pages", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, nargs="+", default=[50.0, 300.0])
    p.add_argument("--rounds", type=int, default=2, help="ours+theirs pairs per latency")
    p.add_argument("--batch", type=int, default=64, help="texts per embedding request (both)")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--overlap-tokens", type=int, default=64)
    p.add_argument("--chunk-chars", type=int, default=2048, help="ours: ~4 chars a token")
    p.add_argument("--overlap-chars", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write the results here")
    # The worker side, run by the orchestrator inside bench/.peer-venv.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(
            args.corpus,
            args.out,
            url=args.url,
            batch=args.batch,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap_tokens,
        )
        args.result.write_text(json.dumps(result) + "\n")
        return 0
    if not PEER_PYTHON.exists():
        sys.stderr.write(
            f"no {PEER_PYTHON}: make the peer venv first (bench/README.md):\n"
            "  python3.11 -m venv bench/.peer-venv\n"
            "  bench/.peer-venv/bin/pip install -r bench/requirements-peer.txt\n"
        )
        return 2
    results = compare(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
