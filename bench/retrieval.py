"""Retrieval quality over the sample corpus: does a question find the right PDF?

    python -m bench.retrieval                   # both models, as a table
    python -m bench.retrieval --model hash      # only the builtin hashing model
    python -m bench.retrieval --model minilm --json

What it measures: the questions in `bench/questions.tsv` (one `file<TAB>question`
a line, each answerable from exactly one PDF of `examples/pdfs/` and paraphrased,
not quoted) are asked of the seven sample PDFs, chunked exactly as the pipeline
chunks them (pypdf text, `chunk_pages(size=800, overlap=150)`). Every chunk and
every question is embedded with the model under test; chunks are scored by cosine
similarity to the question, and files are ranked by their best chunk. hit@1 is
the fraction of questions whose file comes first, hit@3 the fraction whose file
is among the first three distinct files. The misses list the files ranked first.

The models:

- `hash`: `stages.hash_model.embed_texts`, the hashing sketch of words and
  3-grams that `pipeline serve-embeddings` serves by default. It only finds shared
  words, so paraphrased questions defeat it: it is the floor that a real model
  must clear.
- `minilm`: sentence-transformers all-MiniLM-L6-v2 on the CPU, found and loaded
  offline by the pipeline's own loader, `stages.local_model` (a folder, the
  Hugging Face cache, or a package that ships it; never downloaded).

`evaluate()` is importable: `tests/test_retrieval.py` uses it to check that
MiniLM reaches `HIT3_FLOOR` and the hashing model does not (so the floor means
something). With 7 files, a random ranking scores hit@3 = 3/7 on average.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from stages.chunk import chunk_pages
from stages.pdf_text import read_pypdf

__all__ = [
    "CHUNK_OVERLAP",
    "CHUNK_SIZE",
    "CORPUS",
    "HIT3_FLOOR",
    "MINILM",
    "QUESTIONS",
    "Embed",
    "Score",
    "evaluate",
    "hash_embed",
    "load_chunks",
    "load_questions",
    "main",
    "minilm_embed",
]

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "pdfs"
QUESTIONS = Path(__file__).resolve().with_name("questions.tsv")
CHUNK_SIZE = 800
CHUNK_OVERLAP = 150
MINILM = "all-MiniLM-L6-v2"
HIT3_FLOOR = 0.8  # what a real embedding model must reach; the hashing model stays below

Embed = Callable[[list[str]], npt.NDArray[np.floating]]


@dataclass(frozen=True, slots=True)
class Score:
    """How often the expected file came first, or in the first three files."""

    hit1: float
    hit3: float
    n: int
    misses: list[tuple[str, str, list[str]]] = field(default_factory=list)
    """(question, expected file, top three files) for every question not ranked first."""


def load_chunks(
    corpus: Path = CORPUS, *, size: int = CHUNK_SIZE, overlap: int = CHUNK_OVERLAP
) -> list[tuple[str, str]]:
    """Every chunk of every PDF in `corpus` as `(file name, chunk text)`, in file order."""
    chunks: list[tuple[str, str]] = []
    for path in sorted(corpus.glob("*.pdf")):
        pages = read_pypdf(path.read_bytes())
        chunks.extend(
            (path.name, text) for _, text in chunk_pages(pages, size=size, overlap=overlap)
        )
    return chunks


def load_questions(path: Path = QUESTIONS) -> list[tuple[str, str]]:
    """The benchmark's `(file name, question)` pairs."""
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["file"], row["question"]) for row in csv.DictReader(f, delimiter="\t")]


def _unit(rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)  # zero rows stay zero: similarity 0


def evaluate(
    embed: Embed,
    *,
    chunks: list[tuple[str, str]] | None = None,
    questions: list[tuple[str, str]] | None = None,
) -> Score:
    """Score `embed` on `questions` (default: bench/questions.tsv) against `chunks`
    (default: the sample corpus, chunked as the pipeline does).

    Files are ranked by the cosine similarity of their best chunk to the question;
    ties keep the corpus order.
    """
    chunks = load_chunks() if chunks is None else chunks
    questions = load_questions() if questions is None else questions
    if not chunks or not questions:
        raise ValueError("need at least one chunk and one question")
    files = sorted({name for name, _ in chunks})
    index = {name: i for i, name in enumerate(files)}
    owner = np.array([index[name] for name, _ in chunks])
    chunk_vectors = _unit(embed([text for _, text in chunks]))
    question_vectors = _unit(embed([question for _, question in questions]))
    similarity = question_vectors @ chunk_vectors.T  # (questions, chunks)

    best = np.full((len(questions), len(files)), -np.inf)
    for column, file in enumerate(owner):
        np.maximum(best[:, file], similarity[:, column], out=best[:, file])

    hit1 = hit3 = 0
    misses: list[tuple[str, str, list[str]]] = []
    for row, (expected, question) in enumerate(questions):
        ranked = [files[i] for i in np.argsort(-best[row], kind="stable")]
        top3 = ranked[:3]
        hit1 += top3[0] == expected
        hit3 += expected in top3
        if top3[0] != expected:
            misses.append((question, expected, top3))
    n = len(questions)
    return Score(hit1=hit1 / n, hit3=hit3 / n, n=n, misses=misses)


def hash_embed(texts: list[str]) -> npt.NDArray[np.floating]:
    """The builtin hashing model of `pipeline serve-embeddings`."""
    from stages.hash_model import embed_texts

    return embed_texts(texts)


def minilm_embed(model: str = MINILM, *, batch: int = 64) -> Embed:
    """`model` (default all-MiniLM-L6-v2) on the CPU, loaded as the pipeline loads it.

    Raises `stages.local_model.ModelNotFound` if the model is on this machine in
    none of the places the pipeline looks, ImportError without sentence-transformers.
    """
    from stages.local_model import encode, load

    loaded = load(model, device="cpu")

    def embed(texts: list[str]) -> npt.NDArray[np.floating]:
        return encode(loaded, texts, batch=batch)

    return embed


def _row(model: str, score: Score, seconds: float) -> str:
    return f"{model:8}{score.hit1:>8.2f}{score.hit3:>8.2f}{score.n:>5}{seconds:>9.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=["hash", "minilm", "both"], default="both")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # font warnings, as the pipeline does
    chunks = load_chunks()
    questions = load_questions()
    names = ["hash", "minilm"] if args.model == "both" else [args.model]
    results: list[tuple[str, Score, float]] = []
    for name in names:
        start = time.perf_counter()  # model loading included
        embed = hash_embed if name == "hash" else minilm_embed()
        score = evaluate(embed, chunks=chunks, questions=questions)
        results.append((name, score, time.perf_counter() - start))

    if args.json:
        out = {
            "chunks": len(chunks),
            "chunk_size": CHUNK_SIZE,
            "chunk_overlap": CHUNK_OVERLAP,
            "hit3_floor": HIT3_FLOOR,
            "results": [{"model": m, "seconds": round(s, 2), **asdict(sc)} for m, sc, s in results],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{len(questions)} questions, {len(chunks)} chunks (size {CHUNK_SIZE}, overlap "
        f"{CHUNK_OVERLAP}); the test's floor: hit@3 >= {HIT3_FLOOR}"
    )
    print(f"{'model':8}{'hit@1':>8}{'hit@3':>8}{'n':>5}{'seconds':>9}  floor")
    for name, score, seconds in results:
        print(f"{_row(name, score, seconds)}  {'pass' if score.hit3 >= HIT3_FLOOR else 'FAIL'}")
    for name, score, _ in results:
        if score.misses:
            print(f"\n{name}: not ranked first")
        for question, expected, top3 in score.misses:
            mark = "in top 3" if expected in top3 else "MISSED"
            print(f"  [{mark}] {question}\n    expected {expected}; got {', '.join(top3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
