"""What `pipeline serve-embeddings` serves: the hash model, or a real one batched.

A served model has a name, a dimension, an input window and `embed(texts, dims)`.
The HTTP side (`stages.embed_server`) runs a thread per connection; the hash model
is plain numpy and answers in that thread. A sentence-transformers model is one
model in one process, and a forward pass over 64 texts costs little more than over
8, so requests that arrive together are run together: a single model thread takes
every request waiting when it becomes free, encodes all their texts in one call
and hands each request its rows. Under load batches grow by themselves; a lone
request goes at once, never waiting for company.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stages.hash_model import DIMS, MODEL_NAME, embed_texts

__all__ = ["Batcher", "HashModel", "SentenceModel", "ServedModel", "UnsupportedDimensions"]

_MAX_TEXTS = 256  # per forward pass: enough to fill any core, small enough to bound memory


class UnsupportedDimensions(ValueError):
    """The request asked for a vector size the model cannot give (an HTTP 400)."""


class ServedModel(Protocol):
    name: str
    dims: int
    window: int | None  # tokens the model reads, reported at /v1/models

    def embed(self, texts: list[str], dims: int | None) -> npt.NDArray[np.float32]: ...

    def close(self) -> None: ...


@dataclass
class HashModel:
    """The builtin hashing sketch: no model files, fast, for tests and benchmarks."""

    name: str = MODEL_NAME
    dims: int = DIMS
    window: int | None = None

    def embed(self, texts: list[str], dims: int | None) -> npt.NDArray[np.float32]:
        if dims is not None and not 1 <= dims <= self.dims:
            raise UnsupportedDimensions(f"'dimensions' must be an integer in 1..{self.dims}")
        return embed_texts(texts, dims=dims or self.dims)

    def close(self) -> None:
        return None


class Batcher:
    """One thread runs `encode`; requests that wait meanwhile go in its next call.

    `waiting` (requests queued) and `running` (requests in the current call) change
    under `changed`, a Condition, so that a caller can wait for a state, not a time."""

    def __init__(
        self,
        encode: Callable[[list[str]], npt.NDArray[np.float32]],
        *,
        max_texts: int = _MAX_TEXTS,
    ) -> None:
        self._encode = encode
        self._max_texts = max_texts
        self._queue: deque[tuple[list[str], Future[npt.NDArray[np.float32]]]] = deque()
        self._closed = False
        self.changed = threading.Condition()
        self.waiting = 0
        self.running = 0
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """The rows for `texts`, computed with whatever other requests are waiting."""
        done: Future[npt.NDArray[np.float32]] = Future()
        with self.changed:
            if self._closed:
                raise RuntimeError("the model is closed")
            self._queue.append((texts, done))
            self.waiting = len(self._queue)
            self.changed.notify_all()
        return done.result()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self.changed:
            self._closed = True
            self.changed.notify_all()
        self._thread.join()

    def _take(self) -> list[tuple[list[str], Future[npt.NDArray[np.float32]]]]:
        """Every waiting request, up to `max_texts` texts (at least one request)."""
        with self.changed:
            self.running = 0
            self.changed.notify_all()
            self.changed.wait_for(lambda: self._queue or self._closed)
            taken: list[tuple[list[str], Future[npt.NDArray[np.float32]]]] = []
            count = 0
            while self._queue and (not taken or count + len(self._queue[0][0]) <= self._max_texts):
                request = self._queue.popleft()
                taken.append(request)
                count += len(request[0])
            self.waiting, self.running = len(self._queue), len(taken)
            self.changed.notify_all()
            return taken

    def _serve(self) -> None:
        while taken := self._take():
            texts = [text for request, _ in taken for text in request]
            try:
                vectors = self._encode(texts)
            except Exception as exc:  # noqa: BLE001 - every request in the call gets the error
                for _, done in taken:
                    done.set_exception(exc)
                continue
            start = 0
            for request, done in taken:
                done.set_result(vectors[start : start + len(request)])
                start += len(request)


class SentenceModel:
    """A sentence-transformers model behind a Batcher."""

    def __init__(
        self, model: str, *, device: str = "auto", threads: int | None = None, batch: int = 64
    ) -> None:
        from stages import local_model

        loaded = local_model.load(model, device=device, threads=threads)
        self.name = model
        self.dims = int(loaded.get_embedding_dimension() or 0)
        self.window: int | None = int(loaded.max_seq_length or 0) or None
        self.device = str(loaded.device)
        self._batcher = Batcher(lambda texts: local_model.encode(loaded, texts, batch=batch))

    def embed(self, texts: list[str], dims: int | None) -> npt.NDArray[np.float32]:
        if dims is not None and dims != self.dims:
            raise UnsupportedDimensions(
                f"{self.name} gives {self.dims}-dimension vectors only ('dimensions')"
            )
        return self._batcher.embed(texts)

    def close(self) -> None:
        self._batcher.close()
