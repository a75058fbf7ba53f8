"""A model's input window, and how many chunks were longer than it.

Embedding models read a bounded number of tokens (all-MiniLM-L6-v2: 256) and
servers cut longer inputs silently: the end of such a chunk is never embedded and
can never be found. The run says so once, at the end, with a chunk size that fits.

Where the window comes from, first found wins: the stage's `max_input_tokens`;
what the server reports (`/models`: our own `max_input_tokens`, vLLM's
`max_model_len`; TEI's `/info`: `max_input_length`); the table of known models
below. Without any, nothing is counted.

Tokens are estimated, not counted (no tokenizer is shipped for every model):
words, numbers and punctuation marks, plus 15% for the subword pieces that rarer
words split into, plus the two special tokens. That is close for English with
WordPiece and BPE vocabularies, and only texts longer than the window in
characters are estimated at all, since a token is at least one character.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KNOWN_WINDOWS",
    "WindowCounter",
    "estimate_tokens",
    "known_window",
    "window_from_reply",
]

# Tokens each model reads; longer inputs are truncated (or refused, by OpenAI).
KNOWN_WINDOWS: Mapping[str, int] = {
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
    "text-embedding-ada-002": 8191,
    "all-minilm-l6-v2": 256,
    "all-minilm-l12-v2": 256,
    "all-minilm": 256,  # Ollama's name for all-MiniLM-L6-v2
    "all-mpnet-base-v2": 384,
    "multi-qa-minilm-l6-cos-v1": 512,
    "paraphrase-multilingual-minilm-l12-v2": 128,
    "bge-small-en-v1.5": 512,
    "bge-base-en-v1.5": 512,
    "bge-large-en-v1.5": 512,
    "bge-m3": 8192,
    "nomic-embed-text": 2048,  # Ollama's GGUF; the Hugging Face model reads 8192
    "nomic-embed-text-v1": 8192,
    "nomic-embed-text-v1.5": 8192,
    "mxbai-embed-large": 512,
    "mxbai-embed-large-v1": 512,
    "snowflake-arctic-embed": 512,
    "e5-small-v2": 512,
    "e5-base-v2": 512,
    "e5-large-v2": 512,
    "multilingual-e5-small": 512,
    "multilingual-e5-base": 512,
    "multilingual-e5-large": 512,
    "gte-small": 512,
    "gte-base": 512,
    "gte-large": 512,
    "jina-embeddings-v2-small-en": 8192,
    "jina-embeddings-v2-base-en": 8192,
    "gte-qwen2-1.5b-instruct": 32768,
    "gte-qwen2-7b-instruct": 32768,
    "qwen3-embedding-0.6b": 32768,
    "qwen3-embedding-4b": 32768,
    "qwen3-embedding-8b": 32768,
}
_SPECIAL_TOKENS = 2  # [CLS] and [SEP], or their like
_SUBWORDS = 1.15
_PIECE = re.compile(r"\w+|[^\w\s]")
_REPORTED = ("max_input_tokens", "max_model_len", "max_input_length", "context_length")


def known_window(model: str) -> int | None:
    """The window of a known model, by its name or the last part of its path
    (`sentence-transformers/all-MiniLM-L6-v2`, `BAAI/bge-m3`), any case or tag."""
    name = model.rsplit("/", 1)[-1].lower().split(":", 1)[0]
    return KNOWN_WINDOWS.get(name)


def window_from_reply(payload: object, model: str) -> int | None:
    """The window a server reports, from its `/models` list or TEI's `/info` object.

    A server serving one model (infinity, TEI) accepts any model name for it, so its
    only entry counts whatever it is called."""
    entries: list[Any] = []
    if isinstance(payload, dict):
        data = payload.get("data")
        entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
        # The model's own entry; a server serving one model answers for it whatever its name.
        named = [e for e in entries if e.get("id") == model]
        entries = named or (entries if len(entries) == 1 else [payload])
    for entry in entries:
        for key in _REPORTED:
            value = entry.get(key)
            if type(value) is int and value > 0:
                return value
    return None


def estimate_tokens(text: str) -> int:
    """About how many tokens `text` is for a WordPiece or BPE model."""
    return math.ceil(len(_PIECE.findall(text)) * _SUBWORDS) + _SPECIAL_TOKENS


class WindowCounter:
    """Counts the texts longer than a window, and what chunk size would fit."""

    def __init__(self, window: int, *, model: str, source: str, estimated: bool = True) -> None:
        self.window = window
        self.model = model
        self.source = source  # where the window came from, for the note
        self.estimated = estimated  # False when a real tokenizer counted (local models)
        self.texts = 0
        self.over = 0
        self.chars = 0  # of the texts longer than the window in characters
        self.tokens = 0  # ... and their tokens, for the characters-per-token ratio

    def count(self, texts: list[str]) -> int:
        """Count a request's texts; returns how many of them were over the window."""
        over = 0
        for text in texts:
            self.texts += 1
            if len(text) <= self.window - _SPECIAL_TOKENS:
                continue
            tokens = estimate_tokens(text)
            self.chars += len(text)
            self.tokens += tokens
            if tokens > self.window:
                over += 1
        self.over += over
        return over

    def count_exact(self, texts: list[str], tokens: list[int]) -> int:
        """Count texts whose token counts a real tokenizer gave; returns how many were over."""
        over = 0
        for text, n in zip(texts, tokens, strict=True):
            self.texts += 1
            if n > self.window:
                over += 1
                self.chars += len(text)
                self.tokens += n
        self.over += over
        return over

    def fitting_size(self) -> int:
        """Characters per chunk that fit the window with a 10% margin, by the texts seen."""
        per_token = self.chars / self.tokens if self.tokens else 4.0
        size = (self.window - _SPECIAL_TOKENS) * per_token * 0.9
        return max(50, int(size // 50 * 50))

    def note(self) -> str | None:
        """The end-of-run note, if any text was over the window."""
        if not self.over:
            return None
        return (
            f"{self.over} of {self.texts} chunks ({self.over / self.texts:.0%}) were longer "
            f"than {self.model}'s input window of {self.window} tokens ({self.source}"
            f"{'; estimated' if self.estimated else ''}) and were cut by the model: their "
            "ends are not searchable. "
            f"Chunks of at most {self.fitting_size()} characters fit "
            "(text.chunk `size`, with `overlap` below it)"
        )
