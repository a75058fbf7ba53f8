"""The worker side of process pools: a stage chain's outputs, what its fused stages
did (items, pages, time), and counters."""

from __future__ import annotations

import pytest

from pipeline.errors import PermanentError
from pipeline.pools import run_chain
from pipeline.stage import Item, Stage


class Counting(Stage):
    def process(self, items: list[Item]) -> list[Item]:
        self.increment("seen", "items")
        return [Item(i.doc, {"pages": [(1, "text")]}) for i in items]


class Refusing(Stage):
    def process(self, items: list[Item]) -> list[Item]:
        raise PermanentError("no", reason="refused")


def test_a_call_hands_back_what_the_first_stage_counted_once() -> None:
    first = Counting({}, name="first")
    out, work, counts = run_chain([first, Counting({}, name="fused")], [Item("a", {})])

    assert [i.doc for i in out] == ["a"]
    [fused] = work  # counted under its own name: one item in, the one page it carried
    assert (fused.stage, fused.items, fused.pages) == ("fused", 1, 1) and fused.seconds > 0
    assert counts == {("seen", "items"): 1}
    assert run_chain([first], [Item("b", {})])[2] == {("seen", "items"): 1}  # not 2


def test_a_failed_call_counts_nothing_so_its_retry_is_not_counted_twice() -> None:
    first = Counting({}, name="first")
    with pytest.raises(PermanentError) as failed:
        run_chain([first, Refusing({}, name="fused")], [Item("a", {})])
    assert failed.value.stage == "fused"  # the fused stage's failure is its own

    assert run_chain([first], [Item("a", {})])[2] == {("seen", "items"): 1}
