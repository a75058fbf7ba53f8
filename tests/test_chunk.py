"""`text.chunk`: sizes, overlap, page attribution and the shape of its items."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import pytest

from pipeline.stage import Item, ParamProblem
from stages.chunk import Chunk, chunk_pages

# Searchable prose, split into the words `prose` draws from.
WORDS = re.findall(
    r"\w+",
    "pipeline document extraction chunk overlap boundary sentence paragraph page text "
    "search index vector embedding store query a an the of to in on",
)
LONGEST_WORD = max(len(word) for word in WORDS)


def prose(seed: int, *, chars: int) -> str:
    """Deterministic PDF-like text: short lines, sentences, an occasional blank line."""
    rng = random.Random(seed)
    lines: list[str] = []
    length = 0
    while length < chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        line += rng.choice([".", "", "", ",", "  \t"])
        if rng.random() < 0.05:
            line += "\n"
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)


def overlap_of(before: str, after: str) -> int:
    """The longest suffix of `before` that `after` starts with."""
    for k in range(min(len(before), len(after)), 0, -1):
        if before.endswith(after[:k]):
            return k
    return 0


PAGES = [(1, prose(1, chars=5000)), (2, prose(2, chars=3000)), (3, prose(3, chars=7000))]


@pytest.mark.parametrize(("size", "overlap"), [(1200, 200), (500, 0), (300, 299), (80, 20)])
def test_chunks_are_never_longer_than_size(size: int, overlap: int) -> None:
    chunks = chunk_pages(PAGES, size=size, overlap=overlap)

    assert chunks
    assert max(len(text) for _, text in chunks) <= size


@pytest.mark.parametrize(("size", "overlap"), [(1200, 200), (400, 100), (100, 50)])
def test_consecutive_chunks_overlap_by_about_overlap(size: int, overlap: int) -> None:
    chunks = [text for _, text in chunk_pages(PAGES, size=size, overlap=overlap)]

    for before, after in zip(chunks, chunks[1:], strict=False):
        # Never more than asked; less only by the word (with its comma and a
        # paragraph break) that the start moved past to begin on a word.
        assert overlap - LONGEST_WORD - 3 <= overlap_of(before, after) <= overlap


def test_zero_overlap_repeats_nothing() -> None:
    chunks = [text for _, text in chunk_pages(PAGES, size=300, overlap=0)]

    assert " ".join(chunks).split() == " ".join(text for _, text in PAGES).split()


def test_chunks_cut_between_words() -> None:
    chunks = chunk_pages(PAGES, size=250, overlap=60)

    for _, text in chunks:
        assert set(text.replace(".", " ").replace(",", " ").split()) <= set(WORDS)


def test_chunks_end_at_a_sentence_when_one_is_near() -> None:
    sentence = "The pipeline reads every page of the document. "
    text = sentence * 40

    chunks = chunk_pages([(1, text)], size=200, overlap=40)

    assert all(chunk.endswith(".") for _, chunk in chunks)


def test_chunks_prefer_a_paragraph_break() -> None:
    first = "one two three four five six seven. " * 4
    second = "eight nine ten eleven twelve. " * 10
    text = first.strip() + "\n\n" + second

    chunks = chunk_pages([(1, text)], size=200, overlap=0)

    assert chunks[0][1] == first.strip()


def test_chunk_starts_on_the_page_its_first_word_is_on() -> None:
    pages = [(number, " ".join(f"p{number}w{i}" for i in range(300))) for number in (1, 2, 5)]

    chunks = chunk_pages(pages, size=500, overlap=100)

    assert {page for page, _ in chunks} == {1, 2, 5}
    for page, text in chunks:
        assert text.startswith(f"p{page}w")
    spanning = [text for page, text in chunks if page == 1 and "p2w0" in text]
    assert spanning, "no chunk runs over the page break"


def test_pages_without_text_take_no_part() -> None:
    pages = [(1, "  \n\t "), (2, ""), (3, "alpha beta."), (4, "\n\n"), (5, "gamma delta.")]

    chunks = chunk_pages(pages, size=1000, overlap=100)

    assert chunks == [(3, "alpha beta.\n\ngamma delta.")]


def test_no_text_gives_no_chunks() -> None:
    assert chunk_pages([(1, " \n "), (2, "")], size=100, overlap=10) == []
    assert chunk_pages([], size=100, overlap=10) == []


def test_no_chunk_is_empty_or_padded() -> None:
    chunks = chunk_pages(PAGES, size=97, overlap=31)

    assert all(text and text == text.strip() for _, text in chunks)


def test_whitespace_is_normalised() -> None:
    text = "  alpha \t  beta\u00a0\u00a0gamma  \r\n  delta\n\n\n\n  epsilon  \x0c"

    [(_, chunk)] = chunk_pages([(1, text)], size=100, overlap=10)

    assert chunk == "alpha beta gamma\ndelta\n\nepsilon"


def test_same_input_gives_same_chunks() -> None:
    assert chunk_pages(PAGES, size=333, overlap=77) == chunk_pages(PAGES, size=333, overlap=77)


def test_text_without_whitespace_still_chunks() -> None:
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(5000))  # unspaced CJK

    chunks = [chunk for _, chunk in chunk_pages([(1, text)], size=1000, overlap=100)]

    assert all(len(chunk) == 1000 for chunk in chunks[:-1])
    assert all(overlap_of(a, b) == 100 for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[0] + "".join(chunk[100:] for chunk in chunks[1:]) == text


def test_size_one_chunks_every_character() -> None:
    assert chunk_pages([(7, "ab c")], size=1, overlap=0) == [(7, "a"), (7, "b"), (7, "c")]


def test_a_million_characters_chunk_in_linear_time() -> None:
    pages = [(number, prose(number, chars=4000)) for number in range(1, 251)]
    started = time.perf_counter()

    chunks = chunk_pages(pages, size=1200, overlap=200)

    # ~15 ms here; a quadratic pass would take seconds. Generous for loaded CI.
    assert time.perf_counter() - started < 1.0
    assert len(chunks) > 1_000_000 // 1200


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, 150), (100, -1)])
def test_chunk_pages_rejects_impossible_sizes(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap < size"):
        chunk_pages(PAGES, size=size, overlap=overlap)


def test_check_rejects_overlap_not_below_size() -> None:
    assert Chunk.check({"size": 100, "overlap": 100}) == [
        ParamProblem("overlap", "a value below size (100)", 100)
    ]
    assert Chunk.check({"size": 100, "overlap": 250}) == [
        ParamProblem("overlap", "a value below size (100)", 250)
    ]
    assert Chunk.check({"overlap": 1200}) == [
        ParamProblem("overlap", "a value below size (800)", 1200)
    ]


def test_check_accepts_overlap_below_size() -> None:
    assert Chunk.check({"size": 100, "overlap": 99}) == []
    assert Chunk.check({}) == []


def test_process_emits_one_item_per_chunk_with_consecutive_indices() -> None:
    stage = Chunk({"size": 400, "overlap": 80}, name="chunk")
    doc = Item("reports/a.pdf", {"path": "reports/a.pdf", "sha256": "ab" * 32, "pages": PAGES})

    out = stage.process([doc])

    assert out
    assert [item.data["chunk"] for item in out] == list(range(len(out)))
    assert all(item.doc == "reports/a.pdf" for item in out)
    assert all(
        set(item.data) == {"path", "sha256", "page", "chunk", "text"}
        and item.data["path"] == "reports/a.pdf"
        and item.data["sha256"] == "ab" * 32
        for item in out
    )
    expected = chunk_pages(PAGES, size=400, overlap=80)
    assert [(item.data["page"], item.data["text"]) for item in out] == expected


def test_process_numbers_chunks_per_document() -> None:
    stage = Chunk({"size": 300, "overlap": 50}, name="chunk")
    docs = [
        Item(name, {"path": name, "sha256": name, "pages": [(1, prose(seed, chars=1000))]})
        for seed, name in enumerate(["a.pdf", "b.pdf"])
    ]

    out = stage.process(docs)

    for name in ("a.pdf", "b.pdf"):
        indices = [item.data["chunk"] for item in out if item.doc == name]
        assert indices == list(range(len(indices))) and indices


def test_pages_given_as_lists_chunk_like_tuples() -> None:
    """Pages that went through JSON come back as lists."""
    as_lists: list[Any] = [[number, text] for number, text in PAGES]

    assert chunk_pages(as_lists, size=500, overlap=50) == chunk_pages(PAGES, size=500, overlap=50)


def test_params_declare_size_and_overlap() -> None:
    size, overlap = Chunk.PARAMS["size"], Chunk.PARAMS["overlap"]

    assert (size.type, size.default, size.minimum) == ("int", 800, 1)
    assert (overlap.type, overlap.default, overlap.minimum) == ("int", 150, 0)
    assert Chunk.POOLS == ("process", "thread") and Chunk.FUSIBLE
    assert Chunk.DEFAULT_SIZE == 1
