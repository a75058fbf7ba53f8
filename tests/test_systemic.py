"""The verdict on refusals: a setting that fails every document stops the run before any
document is dead-lettered; a poisoned item among good ones fails only its document."""

from __future__ import annotations

import pytest

from pipeline.errors import FatalError, PermanentError, StageError
from pipeline.stage import Item
from pipeline.systemic import SystemicCheck

SETTING = "HTTP 400: dimensions must be <= 384"


def refusal(message: str = SETTING) -> StageError:
    return PermanentError(message, reason="http_400", config_suspect=True)


def items(*docs: str) -> list[Item]:
    return [Item(doc) for doc in docs]


def test_disjoint_batches_refused_alike_before_any_success_stop_the_run() -> None:
    check = SystemicCheck("embed")
    check.refused(items("a.pdf", "b.pdf"), refusal())
    check.refused(items("c.pdf"), refusal())
    with pytest.raises(FatalError, match="dimensions must be <= 384"):
        check.refused(items("d.pdf", "e.pdf"), refusal())


def test_the_halves_of_one_poisoned_batch_are_not_taken_for_disjoint_evidence() -> None:
    check = SystemicCheck("embed")
    batch = items("a.pdf", "a.pdf", "b.pdf", "c.pdf")
    check.refused(batch, refusal())  # the batch holding the poisoned item
    check.refused(batch[:2], refusal())  # the half holding it, then its quarter
    check.refused(batch[:1], refusal())
    check.refused(batch[:1], refusal())  # the same group again: no new evidence
    assert not check.proven  # still one group at fault: no verdict


def test_held_failures_keep_their_documents_open_until_a_success_releases_them() -> None:
    check = SystemicCheck("embed")
    poisoned = items("a.pdf")[0]
    assert check.screen([(poisoned, refusal())]) == []
    assert check.holds(poisoned)
    check.succeeded()
    later = (items("b.pdf")[0], refusal())
    released = check.screen([later])
    assert [item for item, _ in released] == [poisoned, later[0]]
    assert not check.holds(poisoned)
    check.refused(items("x.pdf"), refusal())  # proven: refusals are the items' own
    check.refused(items("y.pdf"), refusal())
    check.refused(items("z.pdf"), refusal())


def test_refusals_of_a_single_document_never_stop_the_run() -> None:
    check = SystemicCheck("embed")
    for _ in range(5):
        check.refused(items("a.pdf"), refusal())


def test_different_refusals_are_not_taken_for_one_cause() -> None:
    check = SystemicCheck("embed")
    for n in range(5):
        check.refused(items(f"{n}.pdf"), refusal(f"input {n} is too long"))


def test_failures_that_cannot_come_from_a_setting_are_recorded_at_once() -> None:
    check = SystemicCheck("extract")
    corrupt = [(Item(f"{n}.pdf"), PermanentError("EOF marker not found")) for n in range(5)]
    for item, error in corrupt:
        check.refused([item], error)
    assert check.screen(corrupt) == corrupt
