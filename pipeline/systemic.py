"""Is a refusal the document's fault or everyone's? Decided before anything is dead-lettered.

A setting the server refuses on every request (`dimensions` above what the model
has, a model name it does not serve) answers each request with the same 400.
Splitting batches would then fail every chunk alone and dead-letter the whole
corpus, and the next run would do it again. So while a stage has not had a
single success, its `config_suspect` failures are held, not recorded: their
documents stay open. If `THRESHOLD` different documents fail with the same
reason and message before anything succeeds, nothing can work: the run stops
(FatalError, exit 3) with the server's reason, and those documents stay pending.
The first success proves the stage works, and what was held is released as the
ordinary per-document failures it then is (one poisoned chunk among good ones
fails only its document). A stage that ends without any success releases its
held failures the same way.
"""

from __future__ import annotations

from pipeline.errors import FatalError, PermanentError, StageError
from pipeline.stage import Item

__all__ = ["THRESHOLD", "SystemicCheck"]

THRESHOLD = 3  # different documents failing alike before any success

Failures = list[tuple[Item, StageError]]


class SystemicCheck:
    """One stage's verdict: proven (something succeeded), or suspect failures held."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.proven = False
        self.held: Failures = []

    def screen(self, failures: Failures) -> tuple[Failures, Failures]:
        """Split into (record now, hold); raises FatalError when the held failures
        show that every document fails alike."""
        if self.proven:
            return failures, []
        now: Failures = []
        held: Failures = []
        for item, error in failures:
            suspect = isinstance(error, PermanentError) and error.config_suspect
            (held if suspect else now).append((item, error))
        self.held += held
        self._judge()
        return now, held

    def prove(self) -> Failures:
        """A success: from now on nothing is held; returns what was held, to record."""
        self.proven = True
        released, self.held = self.held, []
        return released

    def _judge(self) -> None:
        docs: dict[tuple[str, str], set[str]] = {}
        for item, error in self.held:
            docs.setdefault((error.reason, str(error)), set()).add(item.doc)
        for (_reason, message), names in docs.items():
            if len(names) >= THRESHOLD:
                raise FatalError(
                    f"{self.stage}: the first {len(names)} documents were all refused alike, "
                    f"so no document can succeed; check the stage's settings: {message}"
                )
