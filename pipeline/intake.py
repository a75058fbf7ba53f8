"""Deciding, file by file, what enters the pipeline.

Every file the walk finds is accounted for here or downstream. Here it may be
skipped (unchanged since it was indexed, a byte-identical duplicate of another
document, a failure that has not changed since, not a regular file) or fail
before entering (unreadable). Otherwise it is recorded as pending *before* it
enters, so a crash at any later moment leaves a row that tells the next run to
clear its half-written points and index it again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from pipeline.channel import Channel, ChannelClosed
from pipeline.ledger import Ledger
from pipeline.outcome import RunOutcome
from pipeline.source import Entry, file_sha256, walk
from pipeline.stage import Item
from pipeline.state import DocRecord, RunState

__all__ = ["Intake"]

logger = logging.getLogger(__name__)

_SEEN_COMMIT_EVERY = 500
# The walk (listing folders, a stat per file) runs on a thread, this many entries a
# hop; a file this small is hashed on the loop (~0.2 ms): a thread hop would cost
# the engine's process more than the hash.
_WALK_AHEAD = 64
_HASH_INLINE_BYTES = 256 * 1024


class Intake:
    """Feeds the first channel from the source folder until done or told to stop."""

    def __init__(
        self,
        *,
        root: Path,
        pattern: str,
        state: RunState,
        run: int,
        ledger: Ledger,
        outcome: RunOutcome,
        discard: Callable[[list[str]], Awaitable[None]],
        on_handed: Callable[[], None],
        settle_s: float = 0.0,
    ) -> None:
        self._root = root
        self._pattern = pattern
        self._state = state
        self._run = run
        self._ledger = ledger
        self._outcome = outcome
        self._discard = discard
        self._on_handed = on_handed
        self._stopping = False
        self._seen_uncommitted = 0
        self._settle_ns = int(settle_s * 1e9)

    def stop(self) -> None:
        """Stop reading the source; what is already in the pipeline carries on."""
        self._stopping = True

    async def feed(self, inbox: Channel[Item]) -> None:
        """Walk the source into `inbox`; closes it when the walk ends or intake stops."""
        entries = walk(self._root, self._pattern)
        ahead: list[Entry] = []
        try:
            while not self._stopping:
                if not ahead:
                    ahead = await asyncio.to_thread(_next_entries, entries)
                    ahead.reverse()
                if not ahead:
                    self._outcome.walk_complete = True
                    break
                entry = ahead.pop()
                if entry.unread_folder:
                    self._outcome.walk_errors += 1
                    logger.warning("%s: %s; nothing will be pruned", entry.path, entry.skip)
                    continue
                self._outcome.discovered += 1
                item = await self._admit(entry)
                if item is None:
                    continue
                try:
                    await inbox.put(item)
                except ChannelClosed:
                    self._ledger.abandon(item.doc)
                    self._outcome.interrupted += 1
                    break
                self._on_handed()
        finally:
            inbox.close()
            self._state.commit()

    async def _admit(self, entry: Entry) -> Item | None:
        """The item to send for `entry`, or None when it is settled here."""
        state, outcome, path = self._state, self._outcome, entry.path
        record = state.get(path)
        if entry.skip is not None:
            await self._forget(record)
            state.mark_skipped(path, reason="not_a_file", message=entry.skip, run=self._run)
            outcome.skipped += 1
            logger.info("skipped %s: %s", path, entry.skip)
            return None
        if (
            record is not None
            and record.status == "indexed"
            and (record.size, record.mtime_ns) == (entry.size, entry.mtime_ns)
        ):
            self._unchanged(path)
            return None
        if self._settle_ns and time.time_ns() - entry.mtime_ns < self._settle_ns:
            # Still being written, maybe: not read half-way; a later pass takes it.
            if record is not None:
                state.seen(path, self._run)  # present: not to be pruned
            outcome.deferred += 1
            return None
        try:
            if entry.size <= _HASH_INLINE_BYTES:
                sha256 = file_sha256(entry.file)
            else:
                sha256 = await asyncio.to_thread(file_sha256, entry.file)
        except OSError as exc:
            message = f"cannot read file: {exc.strerror or exc}"
            await self._forget(record)
            state.fail_unread(path, reason="unreadable", message=message, run=self._run)
            outcome.record_failure(path, stage="source", reason="unreadable", message=message)
            logger.warning("failed %s at source: %s", path, message)
            return None
        if record is not None and record.sha256 == sha256:
            if record.status == "indexed":
                state.refresh_stat(path, size=entry.size, mtime_ns=entry.mtime_ns)  # a touch
                self._unchanged(path)
                return None
            if record.status == "failed":
                state.seen(path, self._run)
                outcome.skipped += 1
                outcome.previously_failed += 1
                return None
        original = state.indexed_with_hash(sha256, other_than=path)
        if original is not None and not (self._root / original).is_file():
            original = None  # renamed or removed: this copy is the one to index now
        if original is not None:
            await self._forget(record)
            state.mark_skipped(
                path,
                reason="duplicate",
                message=f"same bytes as {original}",
                run=self._run,
                sha256=sha256,
                duplicate_of=original,
            )
            outcome.skipped += 1
            outcome.duplicates += 1
            return None
        # Changed since indexed, or cut off mid-way by a crash: its old points go
        # first, so the collection ends as a clean run would leave it.
        await self._forget(record)
        kind = "updated" if record is not None and record.status == "indexed" else "added"
        state.mark_pending(
            path, sha256=sha256, size=entry.size, mtime_ns=entry.mtime_ns, run=self._run
        )
        self._ledger.start(path, kind=kind)
        return Item(path, {"path": path, "file": str(entry.file), "sha256": sha256})

    async def _forget(self, record: DocRecord | None) -> None:
        """Remove the points of a document that had some, before it changes status."""
        if record is not None and record.status in ("indexed", "pending"):
            await self._discard([record.path])

    def _unchanged(self, path: str) -> None:
        self._state.seen(path, self._run)
        self._seen_uncommitted += 1
        if self._seen_uncommitted >= _SEEN_COMMIT_EVERY:
            self._state.commit()
            self._seen_uncommitted = 0
        self._outcome.skipped += 1
        self._outcome.unchanged += 1


def _next_entries(entries: Iterator[Entry]) -> list[Entry]:
    """Up to `_WALK_AHEAD` entries of the walk; [] once it is done."""
    return list(itertools.islice(entries, _WALK_AHEAD))
