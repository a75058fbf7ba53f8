"""Per-document accounting: when is a document done, and how did it end?

A document enters as one item and fans out (one document, many chunks); items
of many documents share batches. The ledger counts, per document, the items
still somewhere in the pipeline. Outputs are counted before their inputs are
released, so the count only reaches zero when nothing of the document is left
anywhere: that is the moment it is indexed (every chunk acknowledged by the
last stage) or, if any of its items failed, failed. Only documents in flight
are held, so memory follows the channel capacities, not the corpus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.errors import StageError

__all__ = ["Finished", "Ledger"]


@dataclass(slots=True)
class _Open:
    kind: str  # "added" or "updated", for the run summary
    started: float = field(default_factory=time.monotonic)
    outstanding: int = 1
    sunk: int = 0  # items the last stage acknowledged
    failure: tuple[str, StageError] | None = None  # (stage, error), the first one


@dataclass(frozen=True, slots=True)
class Finished:
    """A document whose last item left the pipeline."""

    doc: str
    kind: str
    sunk: int
    failure: tuple[str, StageError] | None
    seconds: float  # from entering the pipeline to leaving it


@dataclass(slots=True)
class Ledger:
    _open: dict[str, _Open] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._open)

    def start(self, doc: str, *, kind: str) -> None:
        self._open[doc] = _Open(kind)

    def abandon(self, doc: str) -> None:
        """Forget a document that never entered the pipeline (intake stopped)."""
        self._open.pop(doc, None)

    def has_failed(self, doc: str) -> bool:
        entry = self._open.get(doc)
        return entry is not None and entry.failure is not None

    def add(self, doc: str, count: int = 1) -> None:
        """`count` more items of `doc` are in the pipeline (a stage produced them)."""
        self._open[doc].outstanding += count

    def sink(self, doc: str, count: int = 1) -> None:
        """The last stage acknowledged `count` items of `doc`."""
        self._open[doc].sunk += count

    def fail(self, doc: str, *, stage: str, error: StageError) -> None:
        entry = self._open[doc]
        if entry.failure is None:
            entry.failure = (stage, error)

    def release(self, doc: str, count: int = 1) -> Finished | None:
        """`count` items of `doc` left the pipeline; returns the document if it is done."""
        entry = self._open[doc]
        entry.outstanding -= count
        if entry.outstanding > 0:
            return None
        del self._open[doc]
        seconds = time.monotonic() - entry.started
        return Finished(doc, entry.kind, entry.sunk, entry.failure, seconds)

    def in_flight(self) -> list[str]:
        return list(self._open)
