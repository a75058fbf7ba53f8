"""Is a refusal the document's fault or everyone's? Decided before anything is dead-lettered.

A setting the server refuses on every request (`dimensions` above what the model
has, a model name it does not serve) answers each request with the same 400.
Splitting batches would then fail every chunk alone and dead-letter the whole
corpus, and the next run would do it again. So until a stage has had one
success, its `config_suspect` refusals are evidence, and the failures they end in
are held, not recorded: their documents stay open.

The evidence is the groups of items refused (a batch, then its halves as it is
split). One poisoned chunk can make only one of several disjoint groups fail; so
once `THRESHOLD` disjoint groups, from more than one document, have been refused
with the same reason and message before anything succeeded, nothing can work:
the run stops (FatalError, exit 3) with the server's reason, and the documents
stay pending for the next run, after the setting is fixed.

The first success proves the stage works: what was held is released as the
ordinary per-document failures it then is (a poisoned chunk among good ones
fails only its document). A stage that ends without a success or a verdict
releases what it held the same way.
"""

from __future__ import annotations

from pipeline.errors import FatalError, PermanentError, StageError
from pipeline.stage import Item

__all__ = ["THRESHOLD", "Failures", "SystemicCheck"]

THRESHOLD = 3  # disjoint groups refused alike before any success

Failures = list[tuple[Item, StageError]]
HELD_MOST = 1024  # refusals that never agree past this many are the items' own
_Group = tuple[frozenset[int], frozenset[str], list[Item]]  # ids, documents, the items
# (the items themselves are kept so that their ids cannot be reused by new items)


class SystemicCheck:
    """One stage's verdict: proven (something succeeded), or refusals held as evidence."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.proven = False
        self._held: Failures = []
        self._held_ids: set[int] = set()
        self._evidence: dict[tuple[str, str], list[_Group]] = {}

    def succeeded(self) -> None:
        """A call of the stage succeeded: it works; nothing is held from now on."""
        self.proven = True
        self._evidence.clear()

    def refused(self, items: list[Item], error: StageError) -> None:
        """A call for `items` was refused; raises FatalError when the refusals show
        that every document fails alike."""
        if self.proven or not (isinstance(error, PermanentError) and error.config_suspect):
            return
        ids = frozenset(id(item) for item in items)
        groups = self._evidence.setdefault((error.reason, str(error)), [])
        if any(held <= ids for held, _, _ in groups):
            return  # holds a smaller refused group: no new evidence
        groups[:] = [group for group in groups if not ids <= group[0]]
        groups.append((ids, frozenset(item.doc for item in items), list(items)))
        documents = frozenset().union(*(docs for _, docs, _ in groups))
        if len(groups) >= THRESHOLD and len(documents) > 1:
            raise FatalError(
                f"{self.stage}: the first requests, for {len(documents)} documents, were all "
                f"refused alike, so no document can succeed; check the stage's settings "
                f"(the documents stay pending): {error}"
            )

    def screen(self, failures: Failures) -> Failures:
        """What to record now: all failures once proven (with any held before), else
        only those that cannot come from a setting; the rest are held."""
        if self.proven:
            return self.drain() + failures
        if len(self._held) > HELD_MOST:
            self.succeeded()  # that many refusals, never the same: each input's own
            return self.drain() + failures
        now: Failures = []
        for item, error in failures:
            if isinstance(error, PermanentError) and error.config_suspect:
                self._held.append((item, error))
                self._held_ids.add(id(item))
            else:
                now.append((item, error))
        return now

    def holds(self, item: Item) -> bool:
        """Is `item`'s failure held (its document kept open)?"""
        return id(item) in self._held_ids

    @property
    def holding(self) -> bool:
        """Whether any failure is held now (if not, no item needs asking about)."""
        return bool(self._held_ids)

    def drain(self) -> Failures:
        """Everything held, to record now (proven, or the stage ended without a verdict)."""
        released, self._held = self._held, []
        self._held_ids.clear()
        return released
