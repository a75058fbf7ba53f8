"""`local.embed` in the pipeline against bare `SentenceTransformer.encode`, and the same
model served by `pipeline serve-embeddings --model`.

    python -m bench.local_embed --docs 100 --pages 3 [--model all-MiniLM-L6-v2] [--batch 64]

Three measured runs over one generated corpus (bench/corpus.py), each in processes
of its own:

- in-process: `pipeline run` with pipeline.yaml's stages, the embed stage replaced
  by `local.embed` (model, batch; threads: its default, the machine's CPUs);
- bare: a fresh Python loads the model with the same torch threads and times
  `model.encode(texts, batch_size=batch)` over exactly the chunk texts the run
  stored (read back from its store), model loading excluded;
- served: `pipeline serve-embeddings --model M` in a subprocess, and `pipeline run`
  with the unchanged `openai.embed` stage against it (its pool adapts to the server).

The model is the limit, so the pipeline's chunks/s should come close to bare
encode's: the target is at least 80% on 2 cores, extraction, chunking and storing
included (they share the cores with the model). The pipeline's figure is over its
whole run, the worker's torch import and model load included; bare's is the encode
call alone. Memory is the peak over each run's process tree (bench.throughput's
sampler), and the server's own peak for the served run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.throughput import (
    OUT,
    PYTHON,
    ROOT,
    BenchOptions,
    TreeSampler,
    corpus_dir,
    embedding_server,
    machine,
    run_measured,
    write_config,
)

__all__ = ["main"]

_BARE = """
import json, resource, sys, time
from stages import local_model
texts = json.load(open(sys.argv[1]))
model = local_model.load(sys.argv[2], device="cpu", threads=int(sys.argv[4]))
local_model.encode(model, texts[:8], batch=8)  # warm up: first-call allocations
started = time.perf_counter()
local_model.encode(model, texts, batch=int(sys.argv[3]))
seconds = time.perf_counter() - started
print(json.dumps({"encode_s": seconds, "max_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _config(folder: Path, corpus: Path, *, embed: dict[str, Any], url: str = "") -> Path:
    path = write_config(folder, corpus, url or "http://127.0.0.1:9/v1", BenchOptions())
    config = yaml.safe_load(path.read_text())
    config["stages"] = [embed if s["name"] == "embed" else s for s in config["stages"]]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(folder: Path, config: Path, name: str) -> dict[str, Any]:
    report = folder / f"{name}.json"
    cmd = [str(PYTHON), "-m", "pipeline", "run", "-c", str(config), "--no-progress"]
    measured = run_measured(cmd + ["--report", str(report)], log=folder / f"{name}.log")
    if measured.returncode != 0:
        tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name}: pipeline run exited {measured.returncode}:\n{tail}")
    body = json.loads(report.read_text())
    embed = next(s for s in body["stages"] if s["name"] == "embed")
    return {
        "chunks": body["chunks"],
        "run_s": body["seconds"],
        "chunks_per_s": body["chunks"] / body["seconds"],
        "embed_busy_s": embed["busy_seconds"],
        "peak_rss_mb": measured.peak_rss_mb,
        "peak_anon_mb": measured.peak_anon_mb,
        "cpu_s": measured.cpu_s,
        "notes": body.get("notes", []),
    }


def _texts(folder: Path) -> Path:
    from stages.qdrant import Upsert

    store = Upsert({"path": folder / "qdrant", "collection": "documents"}, name="store")
    store.open()
    try:
        texts = [payload["text"] for _, payload in store.points().values()]
    finally:
        store.close()
    path = folder / "texts.json"
    path.write_text(json.dumps(texts))
    return path


def bench(docs: int, pages: int, *, model: str, batch: int, threads: int) -> dict[str, Any]:
    corpus = corpus_dir(docs, pages)
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="local-", dir=OUT))
    try:
        params = {"model": model, "batch": batch, "threads": threads}
        local = {"name": "embed", "uses": "local.embed", "with": params}
        result: dict[str, Any] = {"machine": machine(), "docs": docs, "pages": pages}
        result["model"], result["batch"], result["threads"] = model, batch, threads
        result["in_process"] = _run(folder, _config(folder, corpus, embed=local), "in-process")
        texts = _texts(folder)
        done = subprocess.run(
            [str(PYTHON), "-c", _BARE, str(texts), model, str(batch), str(threads)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        bare = json.loads(done.stdout.strip().splitlines()[-1])
        bare["chunks"] = len(json.loads(texts.read_text()))
        bare["chunks_per_s"] = bare["chunks"] / bare["encode_s"]
        result["bare"] = bare
        result["in_process_share"] = result["in_process"]["chunks_per_s"] / bare["chunks_per_s"]

        served_folder = folder / "served"
        served_folder.mkdir()
        with embedding_server(0.0, model=model, log=folder / "server.log") as server:
            api = {
                "name": "embed",
                "uses": "openai.embed",
                "pool": {"kind": "async", "size": 64},
                "with": {"url": server.url, "model": model, "batch": batch},
            }
            config = _config(served_folder, corpus, embed=api, url=server.url)
            with TreeSampler(server.pid) as server_memory:
                result["served"] = _run(served_folder, config, "served")
            result["served"]["server_peak_rss_mb"] = server_memory.peak_rss_kb / 1024
        result["served_share"] = result["served"]["chunks_per_s"] / bare["chunks_per_s"]
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _print(r: dict[str, Any]) -> None:
    bare, local, served = r["bare"], r["in_process"], r["served"]
    print(
        f"{r['model']}, batch {r['batch']}, {r['threads']} torch threads; "
        f"{r['docs']} docs x {r['pages']} pages, {bare['chunks']} chunks"
    )
    print(
        f"  bare encode:  {bare['chunks_per_s']:6.1f} chunks/s ({bare['encode_s']:.1f} s), "
        f"max RSS {bare['max_rss_mb']:.0f} MB"
    )
    for name, run, share in (
        ("in-process", local, r["in_process_share"]),
        ("served", served, r["served_share"]),
    ):
        server = run.get("server_peak_rss_mb")
        extra = f", server {server:.0f} MB" if server is not None else ""
        print(
            f"  {name + ':':13} {run['chunks_per_s']:6.1f} chunks/s ({run['run_s']:.1f} s run) "
            f"= {share:.0%} of bare; peak VmRSS {run['peak_rss_mb']:.0f} MB, "
            f"RssAnon {run['peak_anon_mb']:.0f} MB{extra}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="default: the CPU count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from pipeline.config import cpu_count

    threads = args.threads or cpu_count()
    result = bench(args.docs, args.pages, model=args.model, batch=args.batch, threads=threads)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
