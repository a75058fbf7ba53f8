"""The source walk never blocks, never escapes the folder, never loops."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.source import file_sha256, walk
from tests.engine_stages import write_config, write_corpus
from tests.test_runner import run_once, statuses


def entries(root: Path, pattern: str = "**/*.pdf") -> dict[str, str | None]:
    return {e.path: e.skip for e in walk(root, pattern)}


def test_the_glob_matches_nested_folders_and_any_case(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.pdf": "", "sub/deeper/b.PDF": "", "notes.txt": "", "sub/c.pdfx": ""})
    assert entries(tmp_path) == {"a.pdf": None, "sub/deeper/b.PDF": None}
    assert entries(tmp_path, "*.pdf") == {"a.pdf": None}


def test_a_fifo_named_pdf_is_skipped_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pdf")
    assert entries(tmp_path) == {"pipe.pdf": "not a regular file (FIFO, socket or device)"}


def test_a_folder_named_pdf_is_walked(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"odd.pdf/inner.pdf": ""})
    assert entries(tmp_path) == {"odd.pdf/inner.pdf": None}


def test_a_symlink_out_of_the_source_is_not_followed(tmp_path: Path) -> None:
    outside = write_corpus(tmp_path / "outside", {"secret.pdf": "", "more/x.pdf": ""})
    root = write_corpus(tmp_path / "root", {"in.pdf": ""})
    (root / "link.pdf").symlink_to(outside / "secret.pdf")
    (root / "linked-folder").symlink_to(outside / "more")
    assert entries(root) == {"in.pdf": None, "link.pdf": "symlink leads out of the source folder"}


def test_a_symlink_loop_ends(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a/doc.pdf": ""})
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "self.pdf").symlink_to(tmp_path / "self.pdf")
    found = entries(tmp_path)
    assert found["a/doc.pdf"] is None
    assert found["self.pdf"] == "symlink loop"
    assert len(found) == 2


def test_a_symlink_inside_the_source_is_followed(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"real/doc.pdf": ""})
    (tmp_path / "alias.pdf").symlink_to(tmp_path / "real" / "doc.pdf")
    assert entries(tmp_path) == {"alias.pdf": None, "real/doc.pdf": None}


async def test_hostile_entries_are_recorded_and_the_rest_indexed(tmp_path: Path) -> None:
    docs = write_corpus(tmp_path / "docs", {"good.txt": "fine", "sub/also.txt": "ok"})
    os.mkfifo(docs / "fifo.txt")
    (docs / "out.txt").symlink_to(tmp_path / "pipeline.yaml")
    (docs / "dangling.txt").symlink_to(docs / "missing.txt")
    config = write_config(
        tmp_path,
        """
  - {name: lines, uses: "tests.engine_stages:Lines", pool: {kind: thread, size: 1}}
  - {name: sink, uses: "tests.engine_stages:Sink", with: {name: hostile}}
""",
    )
    _, outcome = await run_once(config)
    assert (outcome.indexed, outcome.skipped, outcome.discovered) == (2, 3, 5)
    assert statuses(config) == {
        "good.txt": "indexed",
        "sub/also.txt": "indexed",
        "fifo.txt": "skipped",
        "out.txt": "skipped",
        "dangling.txt": "skipped",
    }


def test_the_content_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    for size in (0, 17, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20):
        data = os.urandom(size)
        path = tmp_path / f"{size}.pdf"
        path.write_bytes(data)
        assert file_sha256(path) == hashlib.sha256(data).hexdigest(), size
