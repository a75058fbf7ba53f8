"""A process's name is cut as the kernel cuts it, never inside a character."""

from __future__ import annotations

from pipeline.process_name import comm_name


def test_a_long_name_keeps_its_first_15_bytes() -> None:
    assert comm_name("extract_everything worker") == "extract_everyth"
    assert comm_name("embed") == "embed"


def test_a_name_is_never_cut_inside_a_character() -> None:
    # "pdf " is 4 bytes of UTF-8 and each of "テキスト" 3: byte 15 is inside "ト".
    name = comm_name("pdf テキスト worker")
    assert name == "pdf テキス"
    assert len(name.encode()) <= 15
