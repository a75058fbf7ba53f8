"""`hash-384`: the builtin embedding model, a hashing sketch with no model files.

A text becomes the signed-hashing sketch of its lowercased word
unigrams and byte 3-grams in 384 dimensions, L2-normalised: a query shares
direction with the chunks that share its words (and, more weakly, its word
fragments), which is enough for `pipeline search` to find something sensible.

Speed matters more than quality here, because during a benchmark this server
competes with the pipeline for the same cores: every n-gram is hashed with numpy
over the whole batch at once (a polynomial hash from prefix sums, then a
splitmix64 finaliser), never in a Python loop per n-gram. Hashes use fixed
constants, not `hash()`, so vectors are the same in every process and run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["DIMS", "MODEL_NAME", "embed_texts"]

DIMS = 384
MODEL_NAME = "hash-384"

_WORD_WEIGHT = 1.0  # a shared word counts as much as ~4 shared 3-grams: words carry meaning
_GRAM_WEIGHT = 0.25
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_WORD_SALT = np.uint64(0x5851F42D4C957F2D)  # keeps a word and a 3-gram of the same bytes apart
_GRAM_SALT = np.uint64(0x14057B7EF767814F)
_SPACE = 32
# Bytes that belong to words: ASCII letters and digits, and every non-ASCII byte
# (so accented and non-Latin letters stay in their words). Everything else is a gap.
_IS_WORD = np.isin(np.arange(256), [*range(48, 58), *range(65, 91), *range(97, 123)]) | (
    np.arange(256) >= 128
)


def embed_texts(texts: Sequence[str], *, dims: int = DIMS) -> npt.NDArray[np.float32]:
    """Embed `texts` as an (n, dims) float32 array of unit rows (zero rows for texts
    without a word byte).

    `dims` below 384 truncates the 384-dimension vector and renormalises it, as
    the OpenAI API does for its `dimensions` parameter. Raises ValueError for a
    `dims` outside 1..384.
    """
    if not 1 <= dims <= DIMS:
        raise ValueError(f"dims must be in 1..{DIMS}, got {dims}")
    count = len(texts)
    if count == 0:
        return np.zeros((0, dims), dtype=np.float32)
    encoded = [f" {text.lower()} ".encode("utf-8", "replace") for text in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
    raw = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    owner = np.repeat(np.arange(count, dtype=np.int64), lengths)
    # Gaps become one space: keep a gap byte only right after a word byte or at
    # the start of a text, so "a,  b" and "a b" give the same grams.
    word = _IS_WORD[raw]
    keep = word.copy()
    keep[1:] |= word[:-1]
    keep[np.cumsum(lengths) - lengths] = True
    data = np.where(word, raw, _SPACE)[keep].astype(np.uint64)
    owner = owner[keep]
    word = word[keep]

    size = count * DIMS * 2
    grams = np.bincount(_signed_slots(*_gram_hashes(data, owner)), minlength=size)
    words = np.bincount(_signed_slots(*_word_hashes(data, owner, word)), minlength=size)
    # Signed hashing (noise cancels): a hash with its low bit set adds, one without
    # subtracts. Integer counts times weights that are powers of two: exact sums.
    grams, words = grams.reshape(count, DIMS, 2), words.reshape(count, DIMS, 2)
    sums = _GRAM_WEIGHT * (grams[:, :, 1] - grams[:, :, 0]) + _WORD_WEIGHT * (
        words[:, :, 1] - words[:, :, 0]
    )
    return _normalised(sums[:, :dims])


def _gram_hashes(
    data: npt.NDArray[np.uint64], owner: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Hashes of every byte 3-gram that lies inside one text, with its text."""
    inside = owner[:-2] == owner[2:]
    packed = (data[:-2] << np.uint64(16)) | (data[1:-1] << np.uint64(8)) | data[2:]
    return owner[:-2][inside], _mix(packed[inside] ^ _GRAM_SALT)


def _word_hashes(
    data: npt.NDArray[np.uint64], owner: npt.NDArray[np.int64], word: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Hashes of every word, with its text.

    Each word's polynomial hash comes from one prefix sum over the whole batch:
    sum(b[j] * B**j) between its ends, shifted down by B**-start. Arithmetic wraps
    modulo 2**64 on both sides, which is exactly what makes the difference exact.
    Every text starts and ends with a gap, so words never span two texts.
    """
    size = data.size
    powers = _powers(_BASE, size)
    inverse = _powers(_BASE_INV, size)
    prefix = np.zeros(size + 1, dtype=np.uint64)
    np.cumsum(data * powers, out=prefix[1:])
    edges = np.flatnonzero(np.diff(word.view(np.int8)))  # last byte before each change
    starts, ends = edges[0::2] + 1, edges[1::2] + 1
    hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
    return owner[starts], _mix(hashes ^ _WORD_SALT)


def _powers(base: np.uint64, size: int) -> npt.NDArray[np.uint64]:
    """base**0 .. base**(size-1), modulo 2**64: a view of a table kept between calls
    (replaced when it grows, never changed in place, so the server's threads may share
    it), up to `_KEPT` bytes of text; a larger batch gets a table of its own."""
    table = _POWERS.get(int(base))
    if table is None or table.size < size:
        kept = 0 if table is None else table.size
        table = np.ones(max(size, min(2 * kept, _KEPT), 1 << 16), np.uint64)
        np.cumprod(np.full(table.size - 1, base, dtype=np.uint64), out=table[1:])
        if table.size <= _KEPT:
            _POWERS[int(base)] = table
    return table[:size]


_KEPT = 1 << 20  # 8 MB a table: batches of up to ~1 MB of text
_POWERS: dict[int, npt.NDArray[np.uint64]] = {}


assert 2 * DIMS == 3 * 256, "_signed_slots splits 768 bins as 3 * 256"


def _signed_slots(
    owners: npt.NDArray[np.int64], hashes: npt.NDArray[np.uint64]
) -> npt.NDArray[np.int64]:
    """Each hash's bin: its text's 768 bins, then `hash % 768`, which is the slot
    `(hash >> 1) % 384` times two plus the sign bit `hash & 1`.

    768 is 256 * 3, so the remainder is `(hash >> 8) % 3 * 256 + (hash & 255)`:
    numpy divides an int64 array by a constant ~6x faster than it takes a uint64
    remainder, and `hash >> 8` fits in an int64."""
    high = (hashes >> np.uint64(8)).view(np.int64)
    low = (hashes & np.uint64(255)).view(np.int64)
    result: npt.NDArray[np.int64] = owners * (2 * DIMS) + (high - high // 3 * 3) * 256 + low
    return result


def _mix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: spreads similar inputs over all 64 bits."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _normalised(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)
