"""`engine: pdfium` against the shared corpus: the same pages and reasons as pypdf, and
nothing pypdf reads is lost. (pypdf's own results are the manifest's.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PermanentError
from pipeline.stage import Item
from stages.pdf import Extract
from tests.pdfs import CORPUS, MISSING, Sample, samples

# PDFium repairs these; pypdf gives up on them (bench/RESULTS.md section 10).
READ_ONLY_BY_PDFIUM = {"broken-xref-table.pdf", "broken-page-tree-cycle.pdf"}


def pdfium(file: Path) -> Item:
    stage = Extract({"engine": "pdfium", "ocr": "off"}, name="extract")
    stage.open()
    [out] = stage.process([Item(file.name, {"path": file.name, "file": str(file), "sha256": "0"})])
    return out


def reason(file: Path) -> str:
    with pytest.raises(PermanentError) as caught:
        pdfium(file)
    return caught.value.reason


@pytest.mark.parametrize("sample", samples("text"))
def test_pdfium_reads_every_page_pypdf_reads(sample: Sample) -> None:
    out = pdfium(sample.path)
    pages = out.data["pages"]
    assert sample.pages is not None and [n for n, _ in pages] == sorted({n for n, _ in pages})
    assert all(1 <= n <= sample.pages and text.strip() for n, text in pages)
    chars = sum(len(text) for _, text in pages)
    assert chars >= 0.8 * int(sample.pypdf_chars)  # same text, spaced a little differently


@pytest.mark.parametrize("sample", samples("no-text"))
def test_pdfium_fails_textless_files_as_no_text(sample: Sample) -> None:
    assert reason(sample.path) == "no_text"


@pytest.mark.parametrize("sample", samples("encrypted"))
def test_pdfium_fails_password_files_as_encrypted(sample: Sample) -> None:
    assert reason(sample.path) == "encrypted"


@pytest.mark.parametrize("sample", samples("broken"))
def test_pdfium_fails_broken_files_or_repairs_them(sample: Sample) -> None:
    if sample.file in READ_ONLY_BY_PDFIUM:
        assert pdfium(sample.path).data["pages"]
    else:
        assert reason(sample.path) in ("corrupt_pdf", "no_text")


@pytest.mark.skipif(not CORPUS.is_dir(), reason=MISSING)
def test_pdfium_opens_an_empty_user_password() -> None:
    out = pdfium(CORPUS / "encrypted-empty-userpw-aes256.pdf")
    assert out.data["pages"][0][1].strip()
