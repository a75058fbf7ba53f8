"""A deterministic corpus of text PDFs for the benchmarks.

    python -m bench.corpus OUT_DIR --docs N --pages P [--seed S] [--jobs J]

writes OUT_DIR/doc-00000.pdf ... with P pages of prose each, about 2,500
characters a page. The prose comes from a small grammar over a built-in
vocabulary of a few hundred common English words, drawn with Zipf-like weights,
so word and 3-gram statistics look like text (which the embedding server hashes)
and sentence and paragraph breaks sit where the chunker looks for them.

The PDFs are written by hand, not through a layout library: a Catalog, a Pages
tree, the standard Helvetica fonts (no embedding needed), one Flate-compressed
content stream of `Tj` lines per page and a correct cross-reference table. That
keeps the generator dependency-free and fast (4,000 three-page documents in
~7 s on one core) while pypdf still has real parsing to do: objects,
xref, a compressed stream, font encodings.

Every document has its own seed (derived from --seed and its number), so the
same arguments give byte-identical files on any machine, any document can be
made on its own, and no two documents are duplicates (the pipeline skips
byte-identical files, which would flatter its numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import zlib
from collections.abc import Sequence
from itertools import accumulate
from multiprocessing import get_context
from pathlib import Path

__all__ = ["MARKER", "document_pdf", "document_text", "ensure_corpus", "generate"]

MARKER = ".corpus.json"  # what a folder was generated with, so benches can reuse it
CHARS_PER_PAGE = 2500
LINE_CHARS = 92  # Helvetica 10 pt averages ~5 pt a character: 92 fit in 6.9 inches


def _words(text: str) -> list[str]:
    return text.split()


# -- vocabulary, most frequent first within each class (Zipf weights follow rank) --------

_DETERMINERS = _words("the a this each every that our their its one another some any")
_NOUNS = _words(
    "system data process report value result method model user record file table "
    "service request policy section document page index network server client "
    "engine source store query vector batch queue worker stage pipeline channel "
    "limit memory budget schedule project team member customer market price cost "
    "product contract agreement payment invoice account balance period quarter year "
    "month week day hour minute region office branch committee board council "
    "government agency department program study survey sample analysis figure "
    "chapter paragraph sentence word letter number amount rate level measure "
    "standard rule law court case decision appeal claim evidence witness statement "
    "question answer problem solution change increase decrease risk factor effect "
    "cause reason purpose goal plan strategy approach design structure framework "
    "network history library archive collection catalogue author reader editor "
    "publisher version release update feature interface device machine component "
    "material surface energy power water river bridge road city village country "
    "border coast island mountain forest field garden harbour station village "
    "school student teacher course lesson exam degree research paper journal"
)
_NOUNS = list(dict.fromkeys(_NOUNS))  # the lists above are easier to read with repeats
_ADJECTIVES = _words(
    "new large small public private local national general specific important "
    "possible available different similar common final current previous recent "
    "early late annual monthly daily internal external main central primary "
    "secondary additional significant relevant reliable accurate complete partial "
    "simple complex careful detailed formal informal open closed free limited "
    "strong weak high low long short full empty direct indirect clear certain "
    "regular special standard normal useful effective efficient quiet heavy light "
    "modern ancient northern southern eastern western"
)
_VERBS = _words(
    "describes requires provides includes supports shows follows contains covers "
    "explains defines reduces improves increases affects replaces receives sends "
    "reviews records reports measures compares confirms considers presents "
    "produces protects reflects remains represents extends limits manages "
    "maintains meets needs offers opens organises prepares prevents publishes "
    "reaches reads returns selects serves sets starts stores suggests uses "
    "accepts adds allows builds changes checks collects creates delivers enables"
)
_ADVERBS = _words(
    "usually often rarely quickly slowly carefully clearly directly largely mostly "
    "nearly only partly probably recently simply still together already again"
)
_PREPOSITIONS = _words(
    "of in for on with by from under over between through during after before "
    "within without across against along around toward beyond"
)
_CONJUNCTIONS = _words("and but while because although since whereas so")
_OPENER_PHRASES = [
    "However",
    "In practice",
    "For example",
    "In general",
    "As a result",
    "At the same time",
    "In most cases",
    "By contrast",
    "For this reason",
    "In particular",
    "On the other hand",
    "Above all",
]


def _cumulative(words: Sequence[str], skew: float = 0.9) -> list[float]:
    """Zipf-like cumulative weights by rank, for random.choices(cum_weights=...)."""
    return list(accumulate(1.0 / (rank + 1) ** skew for rank in range(len(words))))


_CUM = {
    id(words): _cumulative(words)
    for words in (_DETERMINERS, _NOUNS, _ADJECTIVES, _VERBS, _ADVERBS, _PREPOSITIONS)
}


class _Prose:
    """Sentences from a tiny grammar: [opener,] clause [, conjunction clause]."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _pick(self, words: Sequence[str]) -> str:
        return self.rng.choices(words, cum_weights=_CUM[id(words)])[0]

    def _noun_phrase(self) -> str:
        rng = self.rng
        parts = [self._pick(_DETERMINERS)]
        if rng.random() < 0.55:
            parts.append(self._pick(_ADJECTIVES))
        parts.append(self._pick(_NOUNS))
        if rng.random() < 0.3:
            parts += [self._pick(_PREPOSITIONS), self._pick(_DETERMINERS), self._pick(_NOUNS)]
        return " ".join(parts)

    def _clause(self) -> str:
        rng = self.rng
        subject = self._noun_phrase()
        roll = rng.random()
        if roll < 0.12:
            return f"{subject} is {self._pick(_ADJECTIVES)}"
        verb = self._pick(_VERBS)
        if rng.random() < 0.25:
            verb = f"{self._pick(_ADVERBS)} {verb}"
        clause = f"{subject} {verb} {self._noun_phrase()}"
        if rng.random() < 0.35:
            clause += f" {self._pick(_PREPOSITIONS)} {self._noun_phrase()}"
        return clause

    def sentence(self) -> str:
        rng = self.rng
        text = self._clause()
        if rng.random() < 0.4:
            text += f", {rng.choice(_CONJUNCTIONS)} {self._clause()}"
        if rng.random() < 0.15:
            text = f"{rng.choice(_OPENER_PHRASES)}, {text}"
        if rng.random() < 0.05:
            text += f" in {rng.randint(1990, 2025)}"
        end = "?" if rng.random() < 0.04 else "."
        return text[0].upper() + text[1:] + end

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(3, 8)))

    def title(self) -> str:
        words = [self._pick(_ADJECTIVES), self._pick(_NOUNS), "and", self._pick(_NOUNS)]
        return " ".join(w.capitalize() if w != "and" else w for w in words)


def _wrap(paragraph: str, width: int = LINE_CHARS) -> list[str]:
    """Greedy word wrap; much faster than textwrap for plain prose."""
    lines: list[str] = []
    line: list[str] = []
    used = 0
    for word in paragraph.split():
        if line and used + 1 + len(word) > width:
            lines.append(" ".join(line))
            line, used = [], 0
        used += len(word) + (1 if line else 0)
        line.append(word)
    if line:
        lines.append(" ".join(line))
    return lines


def _doc_seed(seed: int, number: int) -> int:
    return seed * 1_000_003 + number


def document_text(
    number: int, *, pages: int, seed: int, chars_per_page: int = CHARS_PER_PAGE
) -> tuple[str, list[list[str]]]:
    """The title and, per page, the paragraphs of document `number`."""
    prose = _Prose(random.Random(_doc_seed(seed, number)))
    title = f"{prose.title()} ({number:05d})"
    body: list[list[str]] = []
    for _ in range(pages):
        paragraphs: list[str] = []
        size = 0
        while size < chars_per_page - 250:  # paragraphs average ~500 characters
            paragraph = prose.paragraph()
            paragraphs.append(paragraph)
            size += len(paragraph) + 2
        body.append(paragraphs)
    return title, body


def _escape(text: str) -> bytes:
    """A PDF literal string body: backslash, parentheses escaped; Latin-1 (WinAnsi)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return escaped.encode("latin-1", "replace")


def _page_stream(title: str | None, paragraphs: list[str], footer: str) -> bytes:
    ops = [b"BT"]
    if title is not None:
        ops += [b"/F2 16 Tf 56 736 Td (" + _escape(title) + b") Tj", b"0 -28 Td"]
    else:
        ops.append(b"56 736 Td")
    ops += [b"/F1 10 Tf 13 TL"]
    for index, paragraph in enumerate(paragraphs):
        if index:
            ops.append(b"T*")  # an empty line between paragraphs
        for line in _wrap(paragraph):
            ops.append(b"(" + _escape(line) + b") Tj T*")
    ops += [b"ET", b"BT /F1 8 Tf 56 40 Td (" + _escape(footer) + b") Tj ET"]
    return b"\n".join(ops)


def document_pdf(
    number: int, *, pages: int, seed: int, chars_per_page: int = CHARS_PER_PAGE
) -> bytes:
    """The bytes of document `number`: a complete, valid PDF 1.4 file."""
    title, body = document_text(number, pages=pages, seed=seed, chars_per_page=chars_per_page)
    # Object numbers: 1 catalog, 2 pages, 3 Helvetica, 4 Helvetica-Bold, 5 info,
    # then per page i: 6 + 2i the page, 7 + 2i its content stream.
    objects: dict[int, bytes] = {}
    kids = " ".join(f"{6 + 2 * i} 0 R" for i in range(pages))
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[2] = f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode()
    for num, font in ((3, "Helvetica"), (4, "Helvetica-Bold")):
        objects[num] = (
            f"<< /Type /Font /Subtype /Type1 /BaseFont /{font} /Encoding /WinAnsiEncoding >>"
        ).encode()
    objects[5] = b"<< /Title (" + _escape(title) + b") /Producer (bench.corpus) >>"
    resources = b"<< /Font << /F1 3 0 R /F2 4 0 R >> >>"
    for i, paragraphs in enumerate(body):
        footer = f"doc-{number:05d} - page {i + 1} of {pages}"
        stream = zlib.compress(_page_stream(title if i == 0 else None, paragraphs, footer), 6)
        objects[6 + 2 * i] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
            + resources
            + f" /Contents {7 + 2 * i} 0 R >>".encode()
        )
        objects[7 + 2 * i] = (
            f"<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode()
            + stream
            + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = [0] * (len(objects) + 1)
    for num in range(1, len(objects) + 1):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n".encode() + objects[num] + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode()
    out += b"0000000000 65535 f \n"
    for num in range(1, len(objects) + 1):
        out += f"{offsets[num]:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 5 0 R >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


def _write_range(args: tuple[str, int, int, int, int, int]) -> int:
    folder, start, stop, pages, seed, chars = args
    out = Path(folder)
    written = 0
    for number in range(start, stop):
        data = document_pdf(number, pages=pages, seed=seed, chars_per_page=chars)
        (out / f"doc-{number:05d}.pdf").write_bytes(data)
        written += len(data)
    return written


def generate(
    out_dir: Path,
    *,
    docs: int,
    pages: int,
    seed: int = 0,
    chars_per_page: int = CHARS_PER_PAGE,
    jobs: int = 1,
) -> int:
    """Write the corpus into `out_dir` (created); returns the total bytes written.

    With `jobs` > 1 documents are made in that many processes; the files are the
    same either way, since each document has its own seed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, -(-docs // (jobs * 4)))
    ranges = [
        (str(out_dir), start, min(docs, start + step), pages, seed, chars_per_page)
        for start in range(0, docs, step)
    ]
    if jobs <= 1:
        total = sum(_write_range(r) for r in ranges)
    else:
        with get_context("fork").Pool(jobs) as pool:
            total = sum(pool.map(_write_range, ranges))
    marker = {"docs": docs, "pages": pages, "seed": seed, "chars_per_page": chars_per_page}
    (out_dir / MARKER).write_text(json.dumps(marker) + "\n")
    return total


def ensure_corpus(
    out_dir: Path, *, docs: int, pages: int, seed: int = 0, jobs: int | None = None
) -> Path:
    """`out_dir` holding exactly this corpus: reused if its marker matches, else made."""
    marker = out_dir / MARKER
    wanted = {"docs": docs, "pages": pages, "seed": seed, "chars_per_page": CHARS_PER_PAGE}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return out_dir
    if out_dir.exists():
        for old in out_dir.glob("doc-*.pdf"):
            old.unlink()
    generate(out_dir, docs=docs, pages=pages, seed=seed, jobs=jobs or os.cpu_count() or 1)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--docs", type=int, required=True)
    parser.add_argument("--pages", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chars-per-page", type=int, default=CHARS_PER_PAGE)
    parser.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    total = generate(
        args.out_dir,
        docs=args.docs,
        pages=args.pages,
        seed=args.seed,
        chars_per_page=args.chars_per_page,
        jobs=args.jobs,
    )
    seconds = time.perf_counter() - started
    print(
        f"wrote {args.docs} PDFs x {args.pages} pages ({total / 1e6:.1f} MB) "
        f"to {args.out_dir} in {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
