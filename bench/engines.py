"""The two embedded engines of `qdrant.upsert` side by side on the same corpus.

    python -m bench.engines --docs 1000 4000 --pages 3

For each corpus size and each engine (`edge`: Qdrant Edge in-process; `qdrant-client`:
the client's local mode, SQLite plus every vector in RAM) this runs the real
pipeline through bench.throughput with only `engine:` changed, then opens the
finished store in a fresh process and counts its points. It reports:

- points/s of the whole run, and points per second of store-busy time (the
  engine's own speed inside the pipeline, from the report's busy_seconds);
- peak VmRSS and RssAnon of the run's process tree;
- reopen: seconds to open the store and count its points in a new process
  (after imports, timed separately), and that process's peak RSS. Local mode
  reads every point back into memory on open, so this is where it shows.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.throughput import BenchOptions, bench_pipeline, machine

ENGINES = ("edge", "qdrant-client")


def run(docs: int, pages: int, engine: str, *, seed: int, latency_ms: float) -> dict[str, Any]:
    opts = BenchOptions(
        docs=docs,
        pages=pages,
        seed=seed,
        latency_ms=latency_ms,
        engine=engine,
        embed_own_process=False,  # the store a stage of its own: its busy time is its own
    )
    r = bench_pipeline(opts, measure_reopen=True)
    store = next(s for s in r["stages"] if s["name"] == "store")
    busy = max(store["busy_seconds"], 1e-9)
    return {
        "engine": engine,
        "docs": docs,
        "points": r["chunks"],
        "run_s": r["run_s"],
        "points_per_s": r["chunks_per_s"],
        "store_busy_s": store["busy_seconds"],
        "store_utilisation": store["utilisation"],
        "points_per_busy_s": r["chunks"] / busy,
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_anon_mb": r["peak_anon_mb"],
        "reopen": r["reopen"],
        "other_cpu_s": r["other_cpu_s"],  # CPU of processes outside the run: should be ~0
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__)
    p.add_argument("--docs", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--pages", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = []
    print(
        f"{'engine':14}{'docs':>6}{'points':>8}{'run s':>8}{'points/s':>10}{'store busy':>12}"
        f"{'pts/busy s':>12}{'RSS MB':>8}{'anon MB':>8}{'reopen s':>10}{'reopen RSS':>11}"
    )
    for docs in args.docs:
        for engine in args.engines:
            r = run(docs, args.pages, engine, seed=args.seed, latency_ms=args.latency_ms)
            rows.append(r)
            ro = r["reopen"]
            print(
                f"{engine:14}{docs:>6}{r['points']:>8}{r['run_s']:>8.2f}{r['points_per_s']:>10.0f}"
                f"{r['store_busy_s']:>10.1f} s{r['points_per_busy_s']:>12.0f}"
                f"{r['peak_rss_mb']:>8.0f}{r['peak_anon_mb']:>8.0f}"
                f"{ro['open_count_s']:>10.3f}{ro['max_rss_mb']:>8.0f} MB",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
