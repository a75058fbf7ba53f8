"""`pdf.extract`: one PDF file in, its pages' text out.

The stage turns every way a PDF can fail into a `PermanentError` with a short,
bounded `reason`, so one bad file fails its own document and the run goes on:

    unreadable   the file cannot be read (gone, a directory, no permission)
    encrypted    a password is needed; the empty user password did not open it
    corrupt_pdf  pypdf raised while parsing; the message names the exception class
    no_text      parsed, but too little text (a scan, images, text drawn as curves)

A file that is slow rather than broken is not this stage's business: the engine's
per-item timeout kills the worker. pypdf is imported on first use, not with the
module, so loading the stage registry (config checks, `--help`) stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar, Literal

from pipeline.errors import PermanentError
from pipeline.stage import Item, Param, PoolKind, Stage

__all__ = ["Extract"]

logger = logging.getLogger(__name__)

_MESSAGE_LIMIT = 200  # pypdf messages can quote whole objects; keep failure logs readable


class Extract(Stage):
    """Extract each page's text with pypdf's plain mode.

    Plain `extract_text()` and nothing else per page: layout mode is several
    times slower, and chunking normalises whitespace anyway. Pages are kept
    with their true 1-based numbers; pages without text are left out.
    """

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "min_chars": Param(
            "int",
            default=1,
            minimum=0,
            doc="Fail a document as 'no_text' when its text, whitespace stripped, "
            "is shorter than this.",
        ),
    }
    # A process pool first: extraction is CPU-bound pure Python, and a worker
    # process can be killed when a hostile file makes pypdf hang.
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = "auto"

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        super().__init__(params, name=name, concurrency=concurrency)
        self.min_chars: int = self.params.get("min_chars", self.PARAMS["min_chars"].default)

    def open(self) -> None:
        """Quieten pypdf, which logs a warning for every repair it makes on a damaged file.

        Done here rather than at import so importing the stage changes nothing
        global; for a process pool this runs in each worker.
        """
        logging.getLogger("pypdf").setLevel(logging.ERROR)

    def process(self, items: list[Item]) -> list[Item]:
        """Turn each `{"path", "file", "sha256"}` item into one item with its pages.

        Raises PermanentError (reasons above); MemoryError propagates so the
        engine's memory cap, not this stage, decides what happens.
        """
        out: list[Item] = []
        for item in items:
            pages = self._pages(Path(item.data["file"]))
            out.append(
                Item(
                    item.doc,
                    {"path": item.data["path"], "sha256": item.data["sha256"], "pages": pages},
                )
            )
        return out

    def _pages(self, file: Path) -> list[tuple[int, str]]:
        """Read `file` and extract its non-empty pages, failing per the module docstring."""
        try:
            # Read the bytes ourselves (pypdf would do the same for a path), so an
            # OSError here is the file's fault and one later is pypdf's.
            data = file.read_bytes()
        except OSError as exc:
            raise PermanentError(
                f"cannot read file: {exc.strerror or exc}", reason="unreadable"
            ) from exc

        from pypdf.errors import FileNotDecryptedError

        try:
            pages = _read_pages(data)
        except MemoryError:
            raise  # the engine's memory cap handles it; never reported as a bad PDF
        except FileNotDecryptedError as exc:
            raise _password_required() from exc
        # Deliberately broad: on malformed input pypdf raises plain Python errors
        # (AttributeError, AssertionError, KeyError, RecursionError, ...) as well as
        # its own, and any of them means "this file is broken", not "the stage is".
        except Exception as exc:
            raise PermanentError(
                f"not a readable PDF: {_describe(exc)}", reason="corrupt_pdf"
            ) from exc

        if pages is None:
            raise _password_required()
        if sum(len(text.strip()) for _, text in pages) < self.min_chars:
            raise PermanentError(
                "no extractable text (scanned or image-only PDF?)", reason="no_text"
            )
        return pages


def _read_pages(data: bytes) -> list[tuple[int, str]] | None:
    """Parse `data` and extract its pages with text, numbered from 1.

    Encrypted files are opened with the empty user password first: many PDFs are
    encrypted only to set permissions (an owner password) and must be indexed
    like any other file. Returns None when a real password is needed.
    """
    from pypdf import PasswordType, PdfReader

    reader = PdfReader(BytesIO(data))
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        return None
    return [
        (number, text)
        for number, page in enumerate(reader.pages, start=1)
        if (text := page.extract_text()) and not text.isspace()
    ]


def _password_required() -> PermanentError:
    return PermanentError("password required", reason="encrypted")


def _describe(exc: BaseException) -> str:
    """`Class: first line of the message`, bounded; just the class when the message is empty.

    The class leads because it is what tells a pypdf limit (LimitReachedError)
    from a parser bug (AttributeError) when reading the failure list.
    """
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines[0]) <= _MESSAGE_LIMIT else lines[0][: _MESSAGE_LIMIT - 3] + "..."
    return f"{type(exc).__name__}: {text}"
