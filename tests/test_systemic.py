"""The verdict on refusals: a setting that fails every document stops the run before any
document is dead-lettered; a poisoned item among good ones fails only its document."""

from __future__ import annotations

import pytest

from pipeline.errors import FatalError, PermanentError, StageError
from pipeline.stage import Item
from pipeline.systemic import THRESHOLD, SystemicCheck


def refused(doc: str, message: str = "HTTP 400: dimensions must be <= 384") -> tuple[Item, StageError]:
    return Item(doc), PermanentError(message, reason="http_400", config_suspect=True)


def test_the_same_refusal_for_several_documents_before_any_success_stops_the_run() -> None:
    check = SystemicCheck("embed")
    now, held = check.screen([refused("a.pdf"), refused("b.pdf")])
    assert now == [] and len(held) == 2  # held, not dead-lettered: their documents stay open
    with pytest.raises(FatalError, match="dimensions must be <= 384"):
        check.screen([refused("c.pdf")])


def test_many_refusals_of_one_document_are_that_documents_own() -> None:
    check = SystemicCheck("embed")
    check.screen([refused("a.pdf") for _ in range(THRESHOLD * 3)])
    released = check.prove()  # the first success
    assert len(released) == THRESHOLD * 3 and check.held == []
    poisoned = [refused("b.pdf"), refused("c.pdf"), refused("d.pdf")]
    assert check.screen(poisoned) == (poisoned, [])  # proven: recorded at once


def test_different_refusals_are_not_taken_for_one_cause() -> None:
    check = SystemicCheck("embed")
    check.screen([refused(f"{n}.pdf", f"input {n} is too long") for n in range(THRESHOLD + 2)])
    assert len(check.held) == THRESHOLD + 2


def test_failures_that_cannot_come_from_a_setting_are_recorded_at_once() -> None:
    check = SystemicCheck("extract")
    corrupt = [(Item(f"{n}.pdf"), PermanentError("EOF marker not found")) for n in range(5)]
    assert check.screen(corrupt) == (corrupt, [])
