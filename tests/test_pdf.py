"""`pdf.extract` over the shared real-world corpus, run directly: no engine, no channels."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pypdf
import pytest

from pipeline.errors import PermanentError
from pipeline.stage import Item
from stages.pdf import Extract
from tests.pdfs import CORPUS, MISSING, Sample, samples


@pytest.fixture
def extract() -> Iterator[Extract]:
    """An opened stage; the pypdf logger level it sets is put back afterwards."""
    pypdf_logger = logging.getLogger("pypdf")
    level = pypdf_logger.level
    stage = Extract({"min_chars": 1, "ocr": "off"}, name="extract")  # OCR: tests/test_ocr.py
    stage.open()
    yield stage
    stage.close()
    pypdf_logger.setLevel(level)


def source_item(file: Path) -> Item:
    """What the source stage hands on for `file`."""
    return Item(file.name, {"path": file.name, "file": str(file), "sha256": "0" * 64})


def fail(stage: Extract, file: Path) -> PermanentError:
    with pytest.raises(PermanentError) as caught:
        stage.process([source_item(file)])
    return caught.value


def corpus_file(name: str) -> Path:
    if not CORPUS.is_dir():
        pytest.skip(MISSING)
    return CORPUS / name


@pytest.mark.parametrize("sample", samples("text"))
def test_text_file_yields_numbered_pages_with_all_their_text(
    extract: Extract, sample: Sample
) -> None:
    [out] = extract.process([source_item(sample.path)])

    assert out.doc == sample.file
    assert out.data["path"] == sample.file
    assert out.data["sha256"] == "0" * 64
    pages = out.data["pages"]
    assert pages, "no pages with text"
    numbers = [number for number, _ in pages]
    assert numbers == sorted(set(numbers))
    assert sample.pages is not None
    assert numbers[0] >= 1 and numbers[-1] <= sample.pages
    assert all(text.strip() for _, text in pages)
    # pypdf is pinned to the version that measured the manifest, so nothing is lost.
    assert sum(len(text) for _, text in pages) == int(sample.pypdf_chars)


@pytest.mark.parametrize("sample", samples("no-text"))
def test_file_without_text_fails_as_no_text(extract: Extract, sample: Sample) -> None:
    error = fail(extract, sample.path)

    assert error.reason == "no_text"
    assert "no extractable text" in str(error)


@pytest.mark.parametrize("sample", samples("encrypted"))
def test_file_needing_a_password_fails_as_encrypted(extract: Extract, sample: Sample) -> None:
    error = fail(extract, sample.path)

    assert error.reason == "encrypted"
    assert "password" in str(error)


@pytest.mark.parametrize("sample", samples("broken"))
def test_broken_file_fails_as_corrupt_naming_the_exception(
    extract: Extract, sample: Sample
) -> None:
    error = fail(extract, sample.path)

    assert error.reason == "corrupt_pdf"
    assert str(error).startswith(f"not a readable PDF: {sample.pypdf_chars}")
    assert error.__cause__ is not None


def test_directory_fails_as_unreadable(extract: Extract, tmp_path: Path) -> None:
    error = fail(extract, tmp_path)

    assert error.reason == "unreadable"
    assert str(error).startswith("cannot read file: ")


def test_dangling_symlink_fails_as_unreadable(extract: Extract, tmp_path: Path) -> None:
    link = tmp_path / "gone.pdf"
    link.symlink_to(tmp_path / "never-written.pdf")

    error = fail(extract, link)

    assert error.reason == "unreadable"
    assert "No such file" in str(error)


def test_min_chars_fails_a_document_with_too_little_text() -> None:
    file = corpus_file("latex-minimal-1p.pdf")  # 595 characters
    strict = Extract({"min_chars": 10_000}, name="extract")

    assert fail(strict, file).reason == "no_text"


def test_min_chars_zero_lets_a_blank_document_through() -> None:
    file = corpus_file("tiny-blank-515b.pdf")

    [out] = Extract({"min_chars": 0}, name="extract").process([source_item(file)])

    assert out.data["pages"] == []


def test_each_item_of_a_batch_gives_its_own_document(extract: Extract) -> None:
    files = [corpus_file("libreoffice-writer-1p.pdf"), corpus_file("latex-4pages.pdf")]

    out = extract.process([source_item(file) for file in files])

    assert [item.doc for item in out] == [file.name for file in files]
    assert [len(item.data["pages"]) for item in out] == [1, 4]


def test_memory_error_is_not_reported_as_a_bad_pdf(
    extract: Extract, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(pypdf, "PdfReader", exhausted)

    with pytest.raises(MemoryError):
        extract.process([source_item(corpus_file("latex-minimal-1p.pdf"))])


def test_open_silences_pypdf_warnings_on_a_repaired_file(
    extract: Extract, caplog: pytest.LogCaptureFixture
) -> None:
    file = corpus_file("damaged-xref-recoverable.pdf")

    with caplog.at_level(logging.NOTSET):
        extract.process([source_item(file)])

    assert logging.getLogger("pypdf").getEffectiveLevel() == logging.ERROR
    assert not [record for record in caplog.records if record.name.startswith("pypdf")]


def test_params_declare_min_chars() -> None:
    param = Extract.PARAMS["min_chars"]

    assert (param.type, param.default, param.minimum) == ("int", 1, 0)
    assert Extract.POOLS == ("process", "thread")
    assert Extract.DEFAULT_SIZE == "auto"
