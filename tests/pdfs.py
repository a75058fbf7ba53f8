"""The shared real-world PDF corpus, as pytest parameters read from its MANIFEST.tsv.

The corpus lives beside the repository (`../shared/pdfs`), not in it: it is
12.8 MB of third-party files. Where it is absent, every test drawing on it is
reported as skipped with the path it looked for, instead of failing or silently
running nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CORPUS", "MISSING", "Sample", "samples"]

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "pdfs"
MISSING = f"shared PDF corpus not found at {CORPUS}"

# pypdf takes 15-20 s on these; the engine's timeout tests exercise the slow one.
SLOW = {
    "slow-huge-content-stream.pdf": "hostile file, 12-20 s in pypdf: left to the timeout tests",
    "us-gov-irs-1040-instructions-206p.pdf": "206 pages, 15-20 s in pypdf: too slow for unit tests",
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One MANIFEST.tsv row: what the file is and what pypdf 7.1.0 made of it."""

    file: str
    path: Path
    pages: int | None  # None when pypdf cannot open the file
    expected: str  # text, no-text, encrypted or broken
    pypdf_chars: str  # total characters extracted, or the exception class pypdf raised
    source: str
    licence: str
    note: str


def _read() -> list[Sample]:
    with (CORPUS / "MANIFEST.tsv").open(encoding="utf-8", newline="") as fh:
        return [
            Sample(
                file=row["file"],
                path=CORPUS / row["file"],
                pages=None if row["pages"] == "-" else int(row["pages"]),
                expected=row["expected"],
                pypdf_chars=row["pypdf_chars"],
                source=row["source"],
                licence=row["licence"],
                note=row["note"],
            )
            for row in csv.DictReader(fh, delimiter="\t")
        ]


def samples(expected: str) -> list[Any]:
    """pytest parameters for every corpus file marked `expected`, slow ones skipped.

    When the corpus is missing, one skipped parameter carries the reason.
    """
    if not (CORPUS / "MANIFEST.tsv").is_file():
        return [pytest.param(None, id="no-corpus", marks=pytest.mark.skip(reason=MISSING))]
    return [
        pytest.param(
            sample,
            id=sample.file,
            marks=[pytest.mark.skip(reason=SLOW[sample.file])] if sample.file in SLOW else [],
        )
        for sample in _read()
        if sample.expected == expected
    ]
