"""A burst into a watched folder: N files arrive at once while `pipeline watch` runs.

    python -m bench.watch_burst --docs 10000 --pages 1

A generated corpus is moved (renamed, so each file appears whole) into the empty
folder a running `pipeline watch` follows, all at once. The bench samples the
watcher's process tree (RssAnon, the heap) every 0.2 s until the state shows every
document indexed, then stops it with SIGTERM. For scale it also runs `pipeline run`
over the same files: a burst should cost a watcher no more memory than a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.throughput import OUT, PYTHON, ROOT, TreeSampler, corpus_dir, embedding_server

__all__ = ["burst"]


def _config(folder: Path, url: str) -> Path:
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
watch: {{settle_s: 0, rescan_s: 3600}}
stages:
  - {{name: extract, uses: pdf.extract}}
  - {{name: chunk, uses: text.chunk}}
  - {{name: embed, uses: openai.embed, with: {{url: "{url}", model: hash-384}}}}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


def _indexed(state: Path) -> int:
    if not state.is_file():
        return 0
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT COUNT(*) FROM documents WHERE status = 'indexed'").fetchone()
    return int(row[0])


def burst(docs: int, pages: int) -> dict[str, Any]:
    corpus = corpus_dir(docs, pages)
    folder = OUT / f"watch-burst-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "docs").mkdir(parents=True)
    staging = folder / "staging"
    shutil.copytree(corpus, staging)
    result: dict[str, Any] = {"docs": docs, "pages": pages}
    with embedding_server(0.0) as server:
        config = _config(folder, server.url)
        cmd = [str(PYTHON), "-m", "pipeline", "watch", "-c", str(config), "--no-progress"]
        log = (folder / "watch.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid) as sampler:
            time.sleep(3)  # the empty catch-up pass; the burst comes after it
            idle_anon = sampler.peak_anon_kb
            started = time.perf_counter()
            for pdf in sorted(staging.glob("*.pdf")):
                pdf.rename(folder / "docs" / pdf.name)
            moved = time.perf_counter() - started
            while _indexed(folder / "state" / "state.db") < docs:
                if proc.poll() is not None:
                    raise RuntimeError(f"the watcher exited: {proc.returncode}")
                time.sleep(0.5)
            result["indexed_after_s"] = round(time.perf_counter() - started, 2)
            proc.send_signal(signal.SIGTERM)
            result["exit_code"] = proc.wait(timeout=120)
        result["move_s"] = round(moved, 2)
        result["watch_idle_anon_mb"] = round(idle_anon / 1024, 1)
        result["watch_peak_anon_mb"] = round(sampler.peak_anon_kb / 1024, 1)
        # The same files through one `pipeline run`, for scale.
        shutil.rmtree(folder / "state")
        shutil.rmtree(folder / "qdrant")
        proc = subprocess.Popen(
            [str(PYTHON), "-m", "pipeline", "run", "-c", str(config), "--no-progress"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with TreeSampler(proc.pid) as sampler:
            run_started = time.perf_counter()
            proc.wait()
        result["run_s"] = round(time.perf_counter() - run_started, 2)
        result["run_peak_anon_mb"] = round(sampler.peak_anon_kb / 1024, 1)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--pages", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(burst(args.docs, args.pages), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
