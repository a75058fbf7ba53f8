"""The model's input window: where it comes from, and the note about chunks it cut."""

from __future__ import annotations

from stages.model_window import WindowCounter, estimate_tokens, known_window, window_from_reply


def test_known_models_by_name_path_or_tag() -> None:
    assert known_window("sentence-transformers/all-MiniLM-L6-v2") == 256
    assert known_window("text-embedding-3-small") == 8191
    assert known_window("mxbai-embed-large:latest") == 512
    assert known_window("hash-384") is None


def test_windows_servers_report() -> None:
    ours = {"data": [{"id": "other", "max_input_tokens": 8}, {"id": "m", "max_input_tokens": 256}]}
    assert window_from_reply(ours, "m") == 256
    vllm = {"object": "list", "data": [{"id": "BAAI/bge-m3", "max_model_len": 8192}]}
    assert window_from_reply(vllm, "BAAI/bge-m3") == 8192
    tei_info = {"model_id": "BAAI/bge-small-en-v1.5", "max_input_length": 512}
    assert window_from_reply(tei_info, "anything") == 512
    assert window_from_reply({"data": [{"id": "m"}]}, "m") is None
    assert window_from_reply({"data": [{"id": "served-as", "max_input_tokens": 512}]}, "m") == 512
    assert window_from_reply(["not", "a", "mapping"], "m") is None


def test_token_estimate_is_near_wordpiece_for_english() -> None:
    text = "The cat sat on the mat, and then it slept. " * 10
    # bert-base-uncased: 12 tokens a sentence (every word is in its vocabulary) + 2 special.
    # The estimate allows 15% for rarer words splitting, so it errs on the long side here.
    assert 122 <= estimate_tokens(text) <= 1.2 * 122


def test_the_note_counts_chunks_over_the_window_and_names_a_size_that_fits() -> None:
    counter = WindowCounter(64, model="m", source="known model")
    short = "a few words only"
    long = "word " * 200
    assert counter.count([short, long, long]) == 2
    note = counter.note()
    assert note is not None and "2 of 3 chunks (67%)" in note and "64 tokens" in note
    size = counter.fitting_size()
    assert estimate_tokens("word " * (size // 5)) <= 64 < len(long)
    assert WindowCounter(64, model="m", source="s").note() is None
