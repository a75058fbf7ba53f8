"""The two text engines of `pdf.extract`: pypdf and PDFium, with one contract.

Each takes the file's bytes and returns every page as `(number, text)`, numbered
from 1, empty pages included (so OCR knows which to read). Encrypted files are
opened with the empty user password first: many PDFs are encrypted only to set
permissions and must be indexed like any other file. A file that needs a real
password raises PermissionError; anything else raised means a broken file.

- pypdf: pure Python, plain `extract_text()` per page (layout mode is several
  times slower, and chunking normalises whitespace anyway).
- PDFium (pypdfium2, Chrome's PDF engine): C++, several times faster. Not
  thread-safe: it runs on process pools, one document at a time per process.
"""

from __future__ import annotations

from io import BytesIO

__all__ = ["Pages", "read_pdfium", "read_pypdf"]

Pages = list[tuple[int, str]]


def read_pypdf(data: bytes) -> Pages:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import FileNotDecryptedError

    reader = PdfReader(BytesIO(data))
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise PermissionError("password required")
    try:
        return [
            (number, page.extract_text() or "") for number, page in enumerate(reader.pages, start=1)
        ]
    except FileNotDecryptedError as exc:
        raise PermissionError("password required") from exc


def read_pdfium(data: bytes) -> Pages:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)  # tries the empty password by itself
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise PermissionError("password required") from exc
        raise
    try:
        pages: Pages = []
        for index in range(len(document)):
            page = document[index]
            textpage = page.get_textpage()
            text = textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n")
            pages.append((index + 1, text))
            textpage.close()
            page.close()
        return pages
    finally:
        document.close()
