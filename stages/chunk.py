"""`text.chunk`: a document's pages in, overlapping chunks of text out.

Chunks are what get embedded and what a search shows, so they are cut where a
reader would cut: at a paragraph break if there is one near the end of the
window, else after a sentence, else at a line break, else between words. Only a
run of text with no break at all (a long URL, unspaced CJK) is cut mid-word.

Pages are joined into one text before cutting, so a paragraph that runs over a
page break stays in one chunk; each chunk records the page it starts on. The
work is linear in the text: each window is scanned a bounded number of times
and every chunk advances by at least half of `size - overlap`.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from pipeline.stage import Item, Param, ParamProblem, PoolKind, Stage

__all__ = ["Chunk", "chunk_pages"]

# Break points, best first, as (separator, how many of its characters stay with the
# chunk). Sentence ends outrank line breaks because pypdf ends every visual line
# with "\n": a line break in extracted text is layout, a full stop is meaning.
_TIERS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("\n\n", 0),),
    tuple((end + after, 1) for end in ".?!" for after in " \n") + (("。", 1), ("？", 1), ("！", 1)),
    (("\n", 0),),
    ((" ", 0),),
)

_SPACE = re.compile(r"\s")


def chunk_pages(
    pages: Iterable[tuple[int, str]], *, size: int, overlap: int
) -> list[tuple[int, str]]:
    """Cut `(page_number, text)` pages into `(start_page, chunk_text)` chunks.

    Whitespace is normalised first (runs of spaces collapse, blank lines become
    one paragraph break), so chunk sizes count real characters. Every chunk is
    non-empty and at most `size` characters; the next one starts about
    `overlap` characters before the previous one ended, moved forward to a word
    start, so context carries over without duplicating half-words. The same
    input always gives the same chunks.

    Raises ValueError unless `size >= 1` and `0 <= overlap < size`.
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need size >= 1 and 0 <= overlap < size, got {size=} {overlap=}")
    text, starts, numbers = _join(pages)
    # A break this far into the window still moves on by half of size - overlap,
    # which bounds the number of chunks and keeps the whole pass linear.
    min_end = overlap + max(1, (size - overlap) // 2)
    chunks: list[tuple[int, str]] = []
    length = len(text)
    pos = 0
    while pos < length:
        end = length if pos + size >= length else _break(text, pos + min_end, pos + size)
        chunk = text[pos:end].rstrip()
        chunks.append((numbers[bisect_right(starts, pos) - 1], chunk))
        if end >= length:
            break
        pos = _next_start(text, end - overlap, end)
    return chunks


def _join(pages: Iterable[tuple[int, str]]) -> tuple[str, list[int], list[int]]:
    """Normalise each page and join them with paragraph breaks.

    Returns the text, the offset where each non-empty page starts and that
    page's number; a chunk's page is the last start at or before its offset.
    """
    parts: list[str] = []
    starts: list[int] = []
    numbers: list[int] = []
    offset = 0
    for number, raw in pages:
        page = _normalise(raw)
        if not page:
            continue
        if parts:
            parts.append("\n\n")
            offset += 2
        starts.append(offset)
        numbers.append(number)
        parts.append(page)
        offset += len(page)
    return "".join(parts), starts, numbers


def _normalise(text: str) -> str:
    """Collapse whitespace within lines, keep line breaks, turn blank lines into one break.

    str.split and str.join do the work in C, which keeps a million characters
    to a few milliseconds.
    """
    paragraphs: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words:
            lines.append(" ".join(words))
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    if lines:
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _break(text: str, lo: int, hi: int) -> int:
    """Where to end a chunk that may end anywhere in `[lo, hi]`: the best break, else `hi`.

    A separator may straddle `hi` as long as the part kept with the chunk does
    not, so a window ending exactly at a word end is cut there.
    """
    for tier in _TIERS:
        best = -1
        for separator, kept in tier:
            at = text.rfind(separator, lo - kept, hi - kept + len(separator))
            if at >= 0:
                best = max(best, at + kept)
        if best >= 0:
            return best
    return hi


def _next_start(text: str, lo: int, end: int) -> int:
    """Where the next chunk starts: the first word start at or after `lo`, before `end`.

    `lo` is `overlap` characters before the previous chunk's end. If no
    whitespace lies in between (one long word), start at `lo` itself so the
    overlap holds. Leading whitespace is skipped, so no chunk starts blank.
    """
    if lo > 0 and not text[lo - 1].isspace():
        space = _SPACE.search(text, lo, end)
        if space is not None:
            lo = space.start()
    while lo < len(text) and text[lo].isspace():
        lo += 1
    return lo


class Chunk(Stage):
    """Emit one item per chunk of a document's `pages`."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "size": Param(
            "int",
            default=800,
            minimum=1,
            doc="Maximum characters per chunk; 800 fits all-MiniLM-L6-v2's 256 tokens in English.",
        ),
        "overlap": Param(
            "int",
            default=150,
            minimum=0,
            doc="Characters each chunk repeats from the end of the one before; below size.",
        ),
    }
    # Fused into the extraction workers by default (pipeline.fusion): the pages are
    # already there, and only chunks need to cross to the engine's process. On a
    # thread (`pool: {kind: thread}`) it runs in the engine's process instead.
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = 1
    FUSIBLE: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        super().__init__(params, name=name, concurrency=concurrency)
        self.size: int = self.params.get("size", self.PARAMS["size"].default)
        self.overlap: int = self.params.get("overlap", self.PARAMS["overlap"].default)

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """Overlap must be below size, or a chunk would never move past the last."""
        size = params.get("size", cls.PARAMS["size"].default)
        overlap = params.get("overlap", cls.PARAMS["overlap"].default)
        if type(size) is int and type(overlap) is int and overlap >= size:
            return [ParamProblem("overlap", f"a value below size ({size})", overlap)]
        return []

    def process(self, items: list[Item]) -> list[Item]:
        """Turn each `{"path", "sha256", "pages"}` item into its chunk items, in order."""
        out: list[Item] = []
        for item in items:
            path, sha256 = item.data["path"], item.data["sha256"]
            chunks = chunk_pages(item.data["pages"], size=self.size, overlap=self.overlap)
            ocr = set(item.data.get("ocr_pages", ()))
            for index, (page, text) in enumerate(chunks):
                data = {"path": path, "sha256": sha256, "page": page, "chunk": index, "text": text}
                if page in ocr:
                    data["ocr"] = True  # read from the page's image: a user may filter on it
                out.append(Item(item.doc, data))
        return out
