"""OCR of pages without a text layer: real scans from the shared corpus, read in the
extraction stage with the packaged RapidOCR models (the `ocr` extra, installed by
`make test`), plus generated pages: rotated, blank, and a huge image past its timeout.

The expected words were read off the rendered pages by a person, not taken from OCR."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pypdf
import pytest

from pipeline.config import load_config
from pipeline.errors import PermanentError
from pipeline.runner import Runner
from pipeline.stage import Item
from pipeline.state import open_state
from stages.chunk import Chunk
from stages.embed_server import EmbeddingServer
from stages.ocr import ocr_available
from stages.pdf import Extract
from tests.pdfs import CORPUS, MISSING

pytestmark = [
    pytest.mark.skipif(not ocr_available(), reason="the ocr extra is not installed"),
    pytest.mark.skipif(not CORPUS.is_dir(), reason=MISSING),
]

SEEN = {  # words on each scanned page, as a person reads them
    "scanned-2col-brochure.pdf": ["linnsequencer", "midi", "sequence recorder"],
    "scanned-book-page.pdf": ["garden", "kitchen", "branches"],
    "scanned-jbig2.pdf": ["linnsequencer", "professional musician"],
    "scanned-3pages.pdf": ["baiona", "covfefe", "cromulent", "waterman", "laurier"],
    "scanned-printout-wikipedia.pdf": ["optical character recognition", "wikipedia"],
}


def extract(file: Path, **params: object) -> Item:
    stage = Extract(dict(params), name="extract")
    stage.open()
    [out] = stage.process([Item(file.name, {"path": file.name, "file": str(file), "sha256": "0"})])
    return out


def text_of(item: Item) -> str:
    return " ".join(text for _, text in item.data["pages"]).lower()


@pytest.mark.parametrize("name", sorted(SEEN))
def test_scanned_pages_are_read_by_ocr(name: str) -> None:
    out = extract(CORPUS / name)
    text = text_of(out)
    assert all(word in text for word in SEEN[name]), text[:300]
    assert out.data["ocr_pages"] == [number for number, _ in out.data["pages"]]


def test_chunks_of_ocr_pages_say_so_and_others_do_not() -> None:
    out = extract(CORPUS / "scanned-3pages.pdf")
    chunker = Chunk({"size": 400, "overlap": 50}, name="chunk")
    chunks = chunker.process([out])
    assert chunks and all(chunk.data.get("ocr") is True for chunk in chunks)
    text = extract(CORPUS / "latex-4pages.pdf")  # a text layer: OCR never runs
    assert "ocr_pages" not in text.data
    assert all("ocr" not in chunk.data for chunk in chunker.process([text]))


def test_a_page_turned_a_quarter_is_read_the_right_way_up(tmp_path: Path) -> None:
    reader = pypdf.PdfReader(CORPUS / "scanned-3pages.pdf")
    writer = pypdf.PdfWriter()
    writer.add_page(reader.pages[2]).rotate(90)  # the recipe card, sideways
    turned = tmp_path / "turned.pdf"
    writer.write(turned)
    text = text_of(extract(turned))
    assert "waterman" in text and "laurier" in text


def test_a_blank_page_and_a_photo_end_as_no_text(tmp_path: Path) -> None:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=595, height=842)
    blank = tmp_path / "blank.pdf"
    writer.write(blank)
    for file in (blank, CORPUS / "image-only-cmyk.pdf"):
        with pytest.raises(PermanentError) as caught:
            extract(file)
        assert caught.value.reason == "no_text"


def test_ocr_off_or_missing_leaves_scans_as_no_text_with_a_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scan = CORPUS / "scanned-book-page.pdf"
    with pytest.raises(PermanentError) as off:
        extract(scan, ocr="off")
    assert off.value.reason == "no_text" and "pip install" not in str(off.value)
    monkeypatch.setattr("stages.pdf.ocr_available", lambda: False)  # as without the extra
    with pytest.raises(PermanentError) as missing:
        extract(scan)
    assert missing.value.reason == "no_text"
    assert "pip install 'pdf-pipeline[ocr]'" in str(missing.value)


def huge_scan(path: Path) -> None:
    """A one-page PDF holding a 9,000 x 9,000 noise image (Pillow writes it)."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (9000, 9000), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PDF", resolution=600)
    path.write_bytes(buffer.getvalue())


def test_a_page_outrunning_its_timeout_fails_alone(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    huge_scan(docs / "huge.pdf")
    (docs / "fine.pdf").write_bytes((CORPUS / "latex-4pages.pdf").read_bytes())
    with EmbeddingServer() as server:
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            f"""
source: {{path: docs}}
state: state.db
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 1}}, timeout_s: 2}}
  - {{name: chunk, uses: text.chunk}}
  - {{name: embed, uses: openai.embed, with: {{url: "{server.url}", model: hash-384}}}}
  - {{name: store, uses: qdrant.upsert, with: {{path: q, collection: docs}}}}
"""
        )
        cfg = load_config(config)
        state = open_state(cfg.state, exclusive=True)
        try:
            outcome = asyncio.run(Runner(cfg, state=state).run())
        finally:
            state.close()
    assert dict(outcome.failure_reasons) == {"extract: timeout": 1}
    assert outcome.failure_examples["extract: timeout"][0].startswith("huge.pdf")
    assert outcome.indexed == 1  # the worker was replaced; the next document went on
