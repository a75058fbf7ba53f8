"""The CPU floor beside extraction: what chunking, hash-384 and Qdrant Edge cost a
chunk, each alone in this process, against what 85% of bare pypdf leaves for them.

    python -m bench.floor [--docs 300] [--batch 64]

Why it exists: issue 9 asks a run for at least 85% of bare pypdf's pages/s with the
embedding server and the store on the same machine. With every core busy, that
ratio is bare's CPU over all the CPU the run spends, so 85% leaves
`bare / 0.85 - bare` CPU-µs a chunk for everything that is not extraction. This
bench measures the least that "everything" can cost: the calls the pipeline cannot
avoid making (cutting chunks, hashing them into vectors, Edge's `tolist`, `Point`
and `update`, as `EdgeEngine.upsert` makes them), with no HTTP, pipe, channel or
engine around them. If they alone come close to the allowance, no engine work can
reach the target.

It reads the first `--docs` files of the 1,000 x 5 bench corpus (bench/corpus.py,
generated on first use), and also prints Edge's payload conversion per value type,
which is where most of a point's cost goes (the binding tries bool, then number,
before str, and each failed try raises inside it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from bench.throughput import RATIO_TARGET, corpus_dir, machine
from pipeline.heap import keep_heap_pad
from pipeline.source import file_sha256
from stages.chunk import chunk_pages
from stages.hash_model import embed_texts
from stages.pdf_text import read_pypdf
from stages.qdrant import point_id

__all__ = ["main"]

_SIZE, _OVERLAP = 800, 150  # pipeline.yaml's text.chunk
_VALUES: dict[str, Any] = {"bool": True, "None": None, "int": 12345, "float": 0.5, "str": "x" * 40}


class Clock:
    """Process CPU time, summed by part (process time: Edge's own threads count too)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.process_time()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - started


def measure(files: Sequence[Path], root: Path, batch: int, clock: Clock) -> int:
    """Extract, chunk, hash and store `files` as the pipeline would; returns the chunks."""
    texts: list[str] = []
    ids: list[str] = []
    payloads: list[dict[str, Any]] = []
    for file in files:
        data, doc, sha256 = file.read_bytes(), file.relative_to(root).as_posix(), file_sha256(file)
        with clock.part("bare pypdf extraction"):
            pages = read_pypdf(data)
        with clock.part("chunking"):
            chunks = chunk_pages(pages, size=_SIZE, overlap=_OVERLAP)
        for index, (page, text) in enumerate(chunks):
            texts.append(text)
            ids.append(point_id(doc, index))
            payloads.append(
                {"path": doc, "sha256": sha256, "page": page, "chunk": index, "text": text}
            )
    with tempfile.TemporaryDirectory(prefix="floor-") as folder:
        shard = _shard(folder)
        try:
            for at in range(0, len(texts), batch):
                here = slice(at, at + batch)
                with clock.part("hash-384"):
                    vectors = embed_texts(texts[here])
                with clock.part("edge: tolist"):
                    rows = vectors.tolist()
                with clock.part("edge: build qe.Point"):
                    points = [
                        qe.Point(i, v, p)
                        for i, v, p in zip(ids[here], rows, payloads[here], strict=True)
                    ]
                operation = qe.UpdateOperation.upsert_points(points)
                with clock.part("edge: update"):
                    shard.update(operation)
            with clock.part("edge: flush"):
                shard.flush()
        finally:
            shard.close()
    return len(texts)


def payload_costs(points: int = 20_000, keys: int = 5) -> dict[str, float]:
    """µs of `qe.Point` per payload value of each type, beyond an empty payload."""
    vector = [0.0] * 384
    ids = [point_id("doc", i) for i in range(points)]

    def build(payload: dict[str, Any]) -> float:
        started = time.process_time()
        for i in ids:
            qe.Point(i, vector, dict(payload))
        return (time.process_time() - started) / points * 1e6

    empty = build({})
    return {
        kind: (build({f"k{n}": value for n in range(keys)}) - empty) / keys
        for kind, value in _VALUES.items()
    }


def _shard(folder: str) -> qe.EdgeShard:
    """A fresh shard with the keyword index on "path", as `EdgeEngine._adopt` makes it."""
    params = qe.EdgeVectorParams(size=384, distance=qe.Distance.Cosine)
    shard = qe.EdgeShard.create(folder, qe.EdgeConfig(vectors=params))
    shard.update(qe.UpdateOperation.create_field_index("path", qe.PayloadSchemaType.Keyword))
    return shard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--docs", type=int, default=300, help="files of the 1,000 x 5 corpus")
    parser.add_argument("--batch", type=int, default=64, help="texts a request, points an upsert")
    args = parser.parse_args(argv)

    keep_heap_pad()  # as `pipeline serve-embeddings` does for hash-384
    root = corpus_dir(1000, 5)
    files = sorted(root.rglob("*.pdf"))[: args.docs]
    clock = Clock()
    chunks = measure(files, root, args.batch, clock)
    per_chunk = {part: s / chunks * 1e6 for part, s in clock.seconds.items()}
    bare = per_chunk.pop("bare pypdf extraction")
    allowed = bare / RATIO_TARGET - bare
    floor = sum(per_chunk.values())

    info = machine()
    print(f"machine: {info.get('cpu')}, commit {info.get('commit')}")
    print(f"{len(files)} docs of {root.name}, {chunks:,} chunks; CPU-µs a chunk, this process:")
    print(f"  {'bare pypdf extraction':<24}{bare:8.1f}")
    allows = f"{RATIO_TARGET:.0%} allows beside it"
    print(f"  {allows:<24}{allowed:8.1f}  (bare / {RATIO_TARGET} - bare)")
    for part, micros in per_chunk.items():
        print(f"    {part:<22}{micros:8.1f}")
    print(
        f"  {'floor beside extraction':<24}{floor:8.1f}  = {floor / allowed:.0%} of the allowance"
    )
    print("  (before HTTP, JSON, base64, pipes, channels or the engine: none of them is here)")
    costs = payload_costs()
    listed = ", ".join(f"{kind} {micros:.1f}" for kind, micros in costs.items())
    print(f"Edge's qe.Point, µs per payload value beyond an empty payload: {listed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
