"""`pdf.extract`: one PDF file in, its pages' text out.

Two text engines, chosen by `engine:` (`stages.pdf_text`): pypdf (the default)
or PDFium through pypdfium2 (Chrome's PDF engine, several times faster). Pages
whose text layer is empty, or nearly (`ocr_min_chars`), are read by OCR when
`ocr: auto` (the default; `force` reads every page, `off` none), in the same
worker (`stages.ocr`); their chunks carry `ocr: true`.

The stage turns every way a PDF can fail into a `PermanentError` with a short,
bounded `reason`, so one bad file fails its own document and the run goes on:

    unreadable   the file cannot be read (gone, a directory, no permission)
    encrypted    a password is needed; the empty user password did not open it
    corrupt_pdf  the engine raised while parsing; the message names the exception
    no_text      parsed, but too little text, OCR included (a photo, a drawing),
                 or a scan when the OCR extra is not installed (the message says
                 how to install it)

A file that is slow rather than broken is not this stage's business: the engine's
per-item timeout kills the worker. Engines are imported on first use, not with
the module, so loading the stage registry (config checks, `--help`) stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pipeline.errors import PermanentError
from pipeline.stage import Item, Param, ParamProblem, PoolKind, Stage
from stages.ocr import OCR_EXTRA_HINT, PageReader, ocr_available
from stages.pdf_text import Pages, read_pdfium, read_pypdf

__all__ = ["Extract"]

logger = logging.getLogger(__name__)

_MESSAGE_LIMIT = 200  # pypdf messages can quote whole objects; keep failure logs readable


class Extract(Stage):
    """Extract each page's text; pages are kept with their true 1-based numbers,
    pages without text are left out, and `ocr_pages` lists those read by OCR."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "engine": Param(
            "str",
            default="pypdf",
            choices=("pypdf", "pdfium"),
            doc="Text engine: pypdf, or PDFium (faster; same pages, reasons and fields).",
        ),
        "ocr": Param(
            "str",
            default="auto",
            choices=("auto", "off", "force"),
            doc="OCR pages without text (auto), every page (force) or none (off); "
            "needs the ocr extra.",
        ),
        "ocr_min_chars": Param(
            "int",
            default=10,
            minimum=0,
            doc="With ocr: auto, a page with fewer characters than this (whitespace "
            "aside) is read by OCR.",
        ),
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
        defaults = {key: param.default for key, param in self.PARAMS.items()}
        self.min_chars: int = self.params.get("min_chars", defaults["min_chars"])
        self.engine: str = self.params.get("engine", defaults["engine"])
        self.ocr: str = self.params.get("ocr", defaults["ocr"])
        self.ocr_min_chars: int = self.params.get("ocr_min_chars", defaults["ocr_min_chars"])
        self._reader: PageReader | None = None

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """`ocr: force` without the OCR extra could read nothing: say so before the run."""
        if params.get("ocr") == "force" and not ocr_available():
            return [ParamProblem("ocr", f"auto or off ({OCR_EXTRA_HINT})", "force")]
        return []

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
            pages, ocr_pages = self._pages(Path(item.data["file"]))
            data = {"path": item.data["path"], "sha256": item.data["sha256"], "pages": pages}
            if ocr_pages:
                data["ocr_pages"] = ocr_pages
            out.append(Item(item.doc, data))
        return out

    def _pages(self, file: Path) -> tuple[Pages, list[int]]:
        """Read `file`: its non-empty pages and which of them OCR read, failing per the
        module docstring."""
        try:
            # Read the bytes ourselves (pypdf would do the same for a path), so an
            # OSError here is the file's fault and one later is pypdf's.
            data = file.read_bytes()
        except OSError as exc:
            raise PermanentError(
                f"cannot read file: {exc.strerror or exc}", reason="unreadable"
            ) from exc

        read = read_pdfium if self.engine == "pdfium" else read_pypdf
        try:
            pages = read(data)
        except MemoryError:
            raise  # the engine's memory cap handles it; never reported as a bad PDF
        except PermissionError as exc:  # the readers' way of saying "password needed"
            raise _password_required() from exc
        # Deliberately broad: on malformed input pypdf raises plain Python errors
        # (AttributeError, AssertionError, KeyError, RecursionError, ...) as well as
        # its own, and any of them means "this file is broken", not "the stage is".
        except Exception as exc:
            raise PermanentError(
                f"not a readable PDF: {_describe(exc)}", reason="corrupt_pdf"
            ) from exc

        ocr_pages = self._ocr(data, pages)
        kept = [(number, text) for number, text in pages if text and not text.isspace()]
        if sum(len(text.strip()) for _, text in kept) < self.min_chars:
            hint = (
                "" if ocr_pages or self.ocr == "off" or ocr_available() else f"; {OCR_EXTRA_HINT}"
            )
            raise PermanentError(
                f"no extractable text (scanned or image-only PDF?){hint}", reason="no_text"
            )
        return kept, ocr_pages

    def _ocr(self, data: bytes, pages: Pages) -> list[int]:
        """Replace, in place, the text of the pages OCR should read; their numbers."""
        if self.ocr == "off" or not ocr_available():
            return []
        wanted = [
            index
            for index, (_number, text) in enumerate(pages)
            if self.ocr == "force" or len("".join(text.split())) < self.ocr_min_chars
        ]
        if not wanted:
            return []
        import pypdfium2 as pdfium

        if self._reader is None:
            self._reader = PageReader()
        read: list[int] = []
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:  # pypdf read it, PDFium cannot render it
            logger.warning("cannot render pages for OCR: %s", _describe(exc))
            return read
        try:
            for index in wanted:
                number, _text = pages[index]
                text = self._reader.read(document[number - 1])
                if text.strip():
                    pages[index] = (number, text)
                    read.append(number)
        finally:
            document.close()
        return read


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
