"""Walking the source folder: lazily, safely, one entry at a time.

Lazily, because a corpus of millions of files must not become a list in memory:
the walk is a generator over `os.scandir`, and the runner pulls the next entry
only when the first channel has room. Safely, because a folder is input too:
only regular files are opened (a FIFO named `x.pdf` would block the run
forever), symlinks are followed only while they stay inside the source folder,
and each directory is entered once, so a symlink loop ends.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["matches", "Entry", "file_sha256", "walk"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One file the walk matched: a document to consider, or a skip with its reason."""

    path: str  # relative to the source folder, with forward slashes
    file: Path  # absolute
    size: int = 0
    mtime_ns: int = 0
    skip: str | None = None  # why it will not be read, if so
    unread_folder: bool = False  # a folder the walk could not enter: its files are unknown


def walk(root: Path, pattern: str) -> Iterator[Entry]:
    """Yield the files under `root` whose relative path matches `pattern`, sorted per folder."""
    root = root.resolve()
    match = _compile(pattern).fullmatch
    visited: set[tuple[int, int]] = set()
    yield from _walk_dir(root, root, "", match, visited)


def _walk_dir(
    root: Path,
    folder: Path,
    prefix: str,
    match: Callable[[str], object],
    visited: set[tuple[int, int]],
) -> Iterator[Entry]:
    try:
        info = folder.stat()
    except OSError as exc:
        yield Entry(prefix or ".", folder, skip=f"cannot read folder: {exc.strerror}",
                    unread_folder=True)  # fmt: skip
        return
    key = (info.st_dev, info.st_ino)
    if key in visited:
        return  # a symlink loop, or a second link to a folder already walked
    visited.add(key)
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        yield Entry(prefix or ".", folder, skip=f"cannot read folder: {exc.strerror}",
                    unread_folder=True)  # fmt: skip
        return
    for entry in entries:
        rel = prefix + entry.name
        full = Path(entry.path)
        if entry.is_symlink():
            try:
                target = full.resolve()
            except (OSError, RuntimeError):  # pathlib raises RuntimeError on a symlink loop
                if match(rel):
                    yield Entry(rel, full, skip="symlink loop")
                continue
            if not target.is_relative_to(root):
                if match(rel):
                    yield Entry(rel, full, skip="symlink leads out of the source folder")
                continue
        try:
            info = full.stat()
        except OSError as exc:  # dangling symlink, vanished file
            if match(rel):
                yield Entry(rel, full, skip=f"cannot stat: {exc.strerror}")
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk_dir(root, full, rel + "/", match, visited)
        elif match(rel):
            if stat.S_ISREG(info.st_mode):
                yield Entry(rel, full, size=info.st_size, mtime_ns=info.st_mtime_ns)
            else:
                yield Entry(rel, full, skip="not a regular file (FIFO, socket or device)")


def file_sha256(path: Path) -> str:
    """The content hash: a document's identity across renames and runs."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def matches(pattern: str, relative: str) -> bool:
    """Whether a path relative to the source folder is one the walk would take."""
    return _compile(pattern).fullmatch(relative) is not None


@lru_cache(maxsize=16)
def _compile(pattern: str) -> re.Pattern[str]:
    """A glob as a regex: `**/` spans folders (or none), `*` and `?` stay in one."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.IGNORECASE)
