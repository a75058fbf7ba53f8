"""`openai.embed`: embed chunk texts through an OpenAI-compatible embeddings API.

One `process` call is one HTTP request carrying every item's text, whatever
document it came from, so the engine's batching decides the request size. All
calls share one `httpx.AsyncClient` whose pool holds as many keep-alive
connections as the stage has concurrent copies: no call waits for a connection
and none is opened twice.

The stage's whole job at its edge is typing failures, because the engine
retries by type only:

    timeout, 504                -> TransientError(overloaded): the adaptive limit drops
    429                         -> TransientError(overloaded, cool_pool): the pool pauses
    503                         -> TransientError(overloaded, unavailable)
    refused, reset, 502         -> TransientError(unavailable): the pool waits on the breaker
    408, other 5xx, garbled 200 -> TransientError
    401, 403 (the credentials)  -> FatalError
    404, 405 (no such API/model)-> FatalError
    other 4xx (400, 422, ...)   -> PermanentError(config_suspect): the document fails, or
                                   the run stops if the first documents all fail alike

A server's error body is reduced to its reason in any of the usual shapes, never
the input that was sent (`stages.error_body`). The model's input window, where it
can be known (`stages.model_window`), is used to count the chunks the model cuts.

The API key is read from the environment at `open()` and lives only in the
client's default headers: no message, log line or repr built here contains it,
and a server error echoing it back has it redacted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import FatalError, PermanentError, TransientError
from pipeline.stage import AsyncStage, Item, Param, ParamProblem, PoolKind
from stages.error_body import reason_of
from stages.model_window import WindowCounter, known_window, window_from_reply

if TYPE_CHECKING:
    # httpx and numpy (~0.2 s of imports) are imported where used: the engine's
    # process loads this module to check the config, and with `own_process` the
    # calls run in another process.
    import httpx
    import numpy as np
    import numpy.typing as npt

__all__ = ["Embed", "parse_retry_after", "texts_of"]

logger = logging.getLogger(__name__)
_INFO_TIMEOUT_S = 5.0


def texts_of(items: list[Item]) -> list[str]:
    """The chunk texts to embed; an item without one fails (a stage order mistake)."""
    texts = []
    for item in items:
        text = item.data.get("text")
        if not isinstance(text, str):
            raise PermanentError(f"{item.doc}: item has no text to embed", reason="no_text")
        texts.append(text)
    return texts


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    None when the header is absent or unreadable, so the engine falls back to its
    own backoff; a date in the past gives 0. `now` is for tests.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means "-0000"
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Embed(AsyncStage):
    """Adds "vector" (a float32 numpy row) to each item from its "text"."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "url": Param(
            "url", doc="API base URL, e.g. http://127.0.0.1:8000/v1 (POST url/embeddings)"
        ),
        "model": Param("str", doc="model name sent with every request"),
        "api_key_env": Param(
            "env", default=None, doc="name of the variable holding the API key (Bearer)"
        ),
        "batch": Param("int", default=64, minimum=1, doc="texts per request"),
        "request_timeout_s": Param(
            "float",
            default=300.0,
            minimum=0.001,
            doc="deadline for one request, in seconds: long enough for a full batch on a"
            " slow CPU model server (the adaptive limit keeps its queue short)",
        ),
        "max_input_tokens": Param(
            "int",
            default=None,
            minimum=1,
            doc="the model's input window, to count chunks it cuts (default: what the server"
            " reports, or the window of a known model)",
        ),
        "dimensions": Param(
            "int", default=None, minimum=1, doc="ask for vectors of this size (if the model can)"
        ),
        "encoding": Param(
            "str",
            default="base64",
            choices=("float", "base64"),
            doc="reply encoding; base64 float32 is about a third of the JSON size",
        ),
    }
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("async",)
    DEFAULT_SIZE: ClassVar[int] = 64
    COUNTERS: ClassVar[Mapping[str, tuple[str, str]]] = {
        "embedding_requests": ("code", "Embedding API requests by HTTP status or transport error"),
    }

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        super().__init__(params, name=name, concurrency=concurrency)
        self._endpoint = str(self.params["url"]).rstrip("/") + "/embeddings"
        self._model = str(self.params["model"])
        self._key_env: str | None = self.params.get("api_key_env")
        self._timeout_s = float(self.params.get("request_timeout_s", 300.0))
        self._dimensions: int | None = self.params.get("dimensions")
        self._encoding = str(self.params.get("encoding", "base64"))
        self._client: httpx.AsyncClient | None = None
        self._redact: tuple[str, ...] = ()
        self._window: WindowCounter | None = None

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """Flag a url that already ends in /embeddings: every request would 404."""
        url = params.get("url")
        if isinstance(url, str) and url.rstrip("/").endswith("/embeddings"):
            expected = "the API base URL without /embeddings (e.g. http://127.0.0.1:8000/v1)"
            return [ParamProblem("url", expected, url)]
        return []

    @property
    def batch_size(self) -> int:
        return int(self.params.get("batch", 64))

    @property
    def model_name(self) -> str:
        """The model as pipeline.yaml names it; recorded with the collection."""
        return self._model

    def __repr__(self) -> str:
        return f"Embed(name={self.name!r}, url={self._endpoint!r}, model={self._model!r})"

    async def open(self) -> None:
        """Make the shared client; raises FatalError if the key's variable is unset."""
        headers = {}
        if self._key_env is not None:
            key = os.environ.get(self._key_env, "")
            if not key:
                raise FatalError(f"${self._key_env} is not set or empty; it must hold the API key")
            headers["Authorization"] = f"Bearer {key}"
            self._redact = (key,)
        import httpx

        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        self._client = httpx.AsyncClient(
            headers=headers, limits=limits, timeout=httpx.Timeout(self._timeout_s)
        )
        self._window = await self._find_window(self._client)

    async def _find_window(self, client: httpx.AsyncClient) -> WindowCounter | None:
        """The model's input window: set, reported by the server, or known by name."""
        import httpx

        window: int | None = self.params.get("max_input_tokens")
        if window is not None:
            return WindowCounter(window, model=self._model, source="max_input_tokens")
        base = self._endpoint.removesuffix("/embeddings")
        for url in (f"{base}/models", base.removesuffix("/v1") + "/info"):
            try:
                response = await client.get(url, timeout=_INFO_TIMEOUT_S)
                window = window_from_reply(response.json(), self._model)
            except httpx.TransportError:
                break  # not answering (yet): the run's requests will find out why
            except (httpx.HTTPError, ValueError):
                window = None  # a server that does not say is common; fall back to the table
            if window is not None:
                return WindowCounter(window, model=self._model, source="reported by the server")
        window = known_window(self._model)
        if window is not None:
            return WindowCounter(window, model=self._model, source="known model")
        return None

    def notes(self) -> list[str]:
        note = self._window.note() if self._window is not None else None
        return [note] if note else []

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def process(self, items: list[Item]) -> list[Item]:
        """One request for all `items`; each comes back with "vector", in order."""
        texts = texts_of(items)
        vectors = await self._embed(texts)
        over = self._window.count(texts) if self._window is not None else 0
        if over and self._window is not None and self._window.over == over:  # the first ones
            logger.warning(
                "%s: chunks longer than %s's %d-token input window are cut by the model; "
                "how many is said at the end of the run",
                self.name,
                self._model,
                self._window.window,
            )
        return [
            Item(item.doc, {**item.data, "vector": vector, "model": self._model})
            for item, vector in zip(items, vectors, strict=True)
        ]

    async def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Embed `texts` in one request (the QueryEmbedder protocol, for search)."""
        vectors: list[list[float]] = (await self._embed(texts)).tolist()
        return vectors

    async def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One request; the vectors as one float32 matrix, a row per text, in order.

        Rows stay float32 all the way to the store (1.5 kB a 384-dim chunk, against
        ~12 kB as a list of Python floats)."""
        import numpy as np

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self._client is None:
            raise RuntimeError(f"{self.name}: open() was not called")
        payload: dict[str, Any] = {
            "input": texts,
            "model": self._model,
            "encoding_format": self._encoding,
        }
        if self._dimensions is not None:
            payload["dimensions"] = self._dimensions
        try:
            response = await self._post(self._client, payload)
        except TransientError as exc:
            self.increment("embedding_requests", exc.reason)  # "timeout" or "connection"
            raise
        self.increment("embedding_requests", str(response.status_code))
        if not 200 <= response.status_code < 300:
            raise self._status_error(response, texts)
        return self._vectors(response, len(texts))

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
        """POST with an overall deadline; transport failures become TransientError.

        httpx's timeout bounds each phase (connect, each read); `asyncio.timeout`
        bounds the whole call, so a server trickling bytes cannot hold a copy. A
        timeout says the server is saturated (the limit drops before any resend);
        a refused or reset connection says it is not there (the pool waits).
        """
        import httpx

        where = f"embedding request to {self._endpoint}"
        try:
            async with asyncio.timeout(self._timeout_s):
                return await client.post(self._endpoint, json=payload)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise TransientError(
                f"{where} timed out after {self._timeout_s:g}s", reason="timeout", overloaded=True
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise TransientError(
                f"{where} failed: {type(exc).__name__}: {exc}",
                reason="connection",
                unavailable=True,
            ) from exc
        except httpx.DecodingError as exc:  # a body that fails its Content-Encoding
            raise TransientError(
                f"{where}: undecodable reply: {exc}", reason="bad_response"
            ) from exc

    def _status_error(self, response: httpx.Response, texts: list[str]) -> Exception:
        code = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        where = f"embedding API at {self._endpoint} answered HTTP {code}"
        reason = reason_of(response.text, sent=texts, secrets=self._redact)
        if code == 429:
            return TransientError(
                f"{where} (rate limited): {reason}",
                reason="http_429",
                retry_after=retry_after,
                cool_pool=True,
                overloaded=True,
            )
        if code in (502, 503, 504):
            return TransientError(
                f"{where}: {reason}",
                reason=f"http_{code}",
                retry_after=retry_after,
                overloaded=code != 502,
                unavailable=True,
            )
        if code == 408 or code >= 500:
            return TransientError(
                f"{where}: {reason}", reason=f"http_{code}", retry_after=retry_after
            )
        if code in (401, 403):
            check = f"check the key in ${self._key_env}" if self._key_env else "set api_key_env"
            return FatalError(f"embedding API rejected the credentials (HTTP {code}); {check}")
        if code in (404, 405):
            # A wrong url or model fails every request alike: stop, do not dead-letter all.
            return FatalError(f"{where}: {reason}; check url and model")
        return PermanentError(f"{where}: {reason}", reason=f"http_{code}", config_suspect=True)

    def _vectors(self, response: httpx.Response, expected: int) -> npt.NDArray[np.float32]:
        """Decode the embeddings of a 200 reply, in input order.

        Each embedding may be a float list or base64 float32 whatever we asked
        for, since not every compatible server honours `encoding_format`.
        Anything else is a garbled reply (TransientError "bad_response"); vectors
        of another size than `dimensions` asked for fail the run, since no retry
        or other document would fare better.
        """
        import numpy as np

        try:
            data = response.json()["data"]
            if not isinstance(data, list) or len(data) != expected:
                got = len(data) if isinstance(data, list) else type(data).__name__
                raise ValueError(f"{got} embeddings for {expected} inputs")
            indexes = [int(entry.get("index", i)) for i, entry in enumerate(data)]
            if sorted(indexes) != list(range(expected)):
                raise ValueError(f"embedding indexes {indexes[:8]}... are not 0..{expected - 1}")
            ordered = [data[i]["embedding"] for i in np.argsort(indexes, kind="stable")]
            matrix = _decode_all(ordered)
            if matrix.shape[1] == 0 or not np.isfinite(matrix).all():
                raise ValueError("empty or non-finite embeddings")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise TransientError(
                f"embedding API at {self._endpoint} sent a malformed reply: {exc}",
                reason="bad_response",
            ) from exc
        if self._dimensions is not None and matrix.shape[1] != self._dimensions:
            raise FatalError(
                f"embedding API at {self._endpoint} returned {matrix.shape[1]}-dimension "
                f"vectors for dimensions={self._dimensions}; does model {self._model!r} "
                "support the dimensions parameter?"
            )
        return matrix


def _decode_all(embeddings: list[object]) -> npt.NDArray[np.float32]:
    """All embeddings as one (n, dims) matrix.

    The usual reply, base64 rows of one length with no padding (384 or 1,536 float32
    are whole groups of three bytes), is decoded in one call; anything else row by
    row."""
    import numpy as np

    if not embeddings:
        return np.zeros((0, 0), dtype=np.float32)
    first = embeddings[0]
    if (
        isinstance(first, str)
        and len(first) % 4 == 0
        and not first.endswith("=")
        and all(isinstance(e, str) and len(e) == len(first) for e in embeddings)
    ):
        raw = base64.b64decode("".join(embeddings), validate=True)  # type: ignore[arg-type]
        width = len(first) // 4 * 3 // 4
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(len(embeddings), width)
    return np.vstack([_decode(e) for e in embeddings])


def _decode(embedding: object) -> np.ndarray[Any, np.dtype[np.float32]]:
    """One embedding, from base64 little-endian float32 or a JSON number list."""
    import numpy as np

    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError("base64 embedding is not a whole number of float32")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if isinstance(embedding, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in embedding
    ):
        return np.asarray(embedding, dtype=np.float32)
    raise ValueError(f"an embedding is neither base64 nor a number list: {type(embedding)}")
