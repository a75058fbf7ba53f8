"""The run state: one SQLite row per document, the resume point and dead-letter store.

Written by the runner alone (stages never touch it), always after the fact: a
document becomes `indexed` only once the store acknowledged all of its points.
If the process dies between the store's acknowledgement and this commit, the
document is still `pending`, and the next run indexes it again onto the same
point ids: the collection ends the same, nothing is lost, nothing doubles.

WAL with synchronous=NORMAL: a commit survives a killed process without an
fsync per document (power loss may lose the last commits; they are redone).
A lock file next to the database keeps a second run from sharing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import FatalError, InUseError

__all__ = ["DocRecord", "RunState", "open_state"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    path TEXT PRIMARY KEY,        -- relative to the source folder
    sha256 TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    status TEXT NOT NULL,         -- pending, indexed, skipped, failed
    stage TEXT,                   -- where it failed
    reason TEXT,                  -- short label: corrupt_pdf, timeout, http_400...
    message TEXT,                 -- for people
    attempts INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER,
    duplicate_of TEXT,
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    seen_run INTEGER
);
CREATE INDEX IF NOT EXISTS documents_sha ON documents (sha256);
CREATE INDEX IF NOT EXISTS documents_status ON documents (status);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT,
    exit_code INTEGER,
    summary TEXT
);
"""


@dataclass(frozen=True, slots=True)
class DocRecord:
    path: str
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    status: str
    stage: str | None
    reason: str | None
    message: str | None
    attempts: int
    chunks: int | None
    duplicate_of: str | None
    updated: float


class _Guarded:
    """The connection, with failures of the disk under it as FatalError.

    A full disk, an I/O error or a filesystem gone read-only fails every write
    alike: the run stops with exit 3 naming the database and the reason, never a
    traceback, and the next run resumes from the last commit."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise FatalError(
                f"cannot write the run state at {self._path}: {exc}; "
                "the next run resumes from what was saved"
            ) from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._guard():
            return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        with self._guard():
            return self._db.executemany(sql, rows)

    def commit(self) -> None:
        with self._guard():
            self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> _Guarded:
        self._db.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._guard():
            self._db.__exit__(*exc)


class RunState:
    """Typed access to the state database; one instance per process."""

    def __init__(self, db: sqlite3.Connection, lock_fd: int | None, path: Path) -> None:
        self._db = _Guarded(db, path)
        self._lock_fd = lock_fd
        self.path = path

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def begin_run(self) -> int:
        with self._db:
            cur = self._db.execute("INSERT INTO runs (started) VALUES (?)", (time.time(),))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def end_run(self, run: int, *, outcome: str, exit_code: int, summary: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "UPDATE runs SET finished = ?, outcome = ?, exit_code = ?, summary = ?"
                " WHERE id = ?",
                (time.time(), outcome, exit_code, json.dumps(summary), run),
            )

    def last_run(self) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT id, started, finished, outcome, exit_code, summary FROM runs"
            " ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        keys = ("id", "started", "finished", "outcome", "exit_code", "summary")
        run = dict(zip(keys, row, strict=True))
        run["summary"] = json.loads(run["summary"]) if run["summary"] else None
        return run

    # -- documents ---------------------------------------------------------------

    def get(self, path: str) -> DocRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM documents WHERE path = ?", (path,))
        found = row.fetchone()
        return DocRecord(*found) if found else None

    def indexed_with_hash(self, sha256: str, *, other_than: str) -> str | None:
        """The path of another indexed or in-flight document with these bytes."""
        row = self._db.execute(
            "SELECT path FROM documents WHERE sha256 = ? AND path != ?"
            " AND status IN ('indexed', 'pending') AND duplicate_of IS NULL LIMIT 1",
            (sha256, other_than),
        ).fetchone()
        return row[0] if row else None

    def seen(self, path: str, run: int) -> None:
        """Note that the walk of `run` found `path` (unchanged documents included)."""
        self._db.execute("UPDATE documents SET seen_run = ? WHERE path = ?", (run, path))

    def refresh_stat(self, path: str, *, size: int, mtime_ns: int) -> None:
        """Same bytes, new mtime (a touch): remember it, so the next walk needs no hash."""
        self._db.execute(
            "UPDATE documents SET size = ?, mtime_ns = ? WHERE path = ?", (size, mtime_ns, path)
        )

    def mark_pending(self, path: str, *, sha256: str, size: int, mtime_ns: int, run: int) -> None:
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO documents (path, sha256, size, mtime_ns, status, attempts,"
                " first_seen, updated, seen_run) VALUES (?, ?, ?, ?, 'pending', 1, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256,"
                " size = excluded.size, mtime_ns = excluded.mtime_ns, status = 'pending',"
                " stage = NULL, reason = NULL, message = NULL, chunks = NULL,"
                " duplicate_of = NULL, attempts = attempts + 1, updated = excluded.updated,"
                " seen_run = excluded.seen_run",
                (path, sha256, size, mtime_ns, now, now, run),
            )

    def mark_indexed(self, path: str, *, chunks: int) -> None:
        with self._db:
            self._db.execute(
                "UPDATE documents SET status = 'indexed', chunks = ?, stage = NULL,"
                " reason = NULL, message = NULL, updated = ? WHERE path = ?",
                (chunks, time.time(), path),
            )

    def mark_failed(self, path: str, *, stage: str, reason: str, message: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE documents SET status = 'failed', stage = ?, reason = ?, message = ?,"
                " chunks = NULL, updated = ? WHERE path = ?",
                (stage, reason, message, time.time(), path),
            )

    def mark_skipped(
        self,
        path: str,
        *,
        reason: str,
        message: str,
        run: int,
        sha256: str | None = None,
        duplicate_of: str | None = None,
    ) -> None:
        """Record a document the run will not index: a duplicate, a FIFO, a symlink out."""
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO documents (path, sha256, status, reason, message, duplicate_of,"
                " first_seen, updated, seen_run) VALUES (?, ?, 'skipped', ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET status = 'skipped', sha256 = excluded.sha256,"
                " reason = excluded.reason, message = excluded.message, stage = NULL,"
                " duplicate_of = excluded.duplicate_of, chunks = NULL,"
                " updated = excluded.updated, seen_run = excluded.seen_run",
                (path, sha256, reason, message, duplicate_of, now, now, run),
            )

    def fail_unread(self, path: str, *, reason: str, message: str, run: int) -> None:
        """Record a file that failed before it could be hashed (unreadable)."""
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO documents (path, status, stage, reason, message, attempts,"
                " first_seen, updated, seen_run) VALUES (?, 'failed', 'source', ?, ?, 1, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET status = 'failed', stage = 'source',"
                " reason = excluded.reason, message = excluded.message,"
                " attempts = attempts + 1, updated = excluded.updated,"
                " seen_run = excluded.seen_run",
                (path, reason, message, now, now, run),
            )

    def commit(self) -> None:
        self._db.commit()

    def not_seen_since(self, run: int) -> Iterator[str]:
        """Documents the walk of `run` did not find: removed from the source."""
        rows = self._db.execute(
            "SELECT path FROM documents WHERE seen_run IS NULL OR seen_run != ?", (run,)
        )
        for (path,) in rows.fetchall():
            yield path

    def remove(self, paths: Sequence[str]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM documents WHERE path = ?", [(p,) for p in paths])

    def failed(self) -> list[DocRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM documents WHERE status = 'failed' ORDER BY path"
        )
        return [DocRecord(*row) for row in rows.fetchall()]

    def requeue(self, paths: Sequence[str] | None = None) -> int:
        """Make failed documents pending again so the next run retries them."""
        with self._db:
            if paths:
                cur = self._db.executemany(
                    "UPDATE documents SET status = 'pending' WHERE status = 'failed' AND path = ?",
                    [(p,) for p in paths],
                )
            else:
                cur = self._db.execute(
                    "UPDATE documents SET status = 'pending' WHERE status = 'failed'"
                )
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM documents GROUP BY status")
        return {status: n for status, n in rows.fetchall()}


_COLUMNS = (
    "path, sha256, size, mtime_ns, status, stage, reason, message, attempts, chunks,"
    " duplicate_of, updated"
)


def open_state(path: Path, *, exclusive: bool) -> RunState:
    """Open (creating) the state database.

    `exclusive` takes the run lock: a second run on the same state gets a
    FatalError instead of interleaving its writes with ours. Read-only commands
    (`status`, `failed`) open without it.
    """
    lock_fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FatalError(f"cannot open the run state at {path}: {exc.strerror or exc}") from exc
    if lock_fd is not None:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise InUseError(f"state in use by another run: {path}") from None
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level="DEFERRED")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise FatalError(f"cannot open the run state at {path}: {exc}") from exc
    return RunState(db, lock_fd, path)
