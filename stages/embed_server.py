"""The builtin OpenAI-compatible embedding server: `pipeline serve-embeddings`.

It needs no model, so the pipeline can be run, tested and benchmarked end to end
on any machine. A text becomes the signed-hashing sketch of its lowercased word
unigrams and byte 3-grams in 384 dimensions, L2-normalised: a query shares
direction with the chunks that share its words (and, more weakly, its word
fragments), which is enough for `pipeline search` to find something sensible.

Speed matters more than quality here, because during a benchmark this server
competes with the pipeline for the same cores: every n-gram is hashed with numpy
over the whole batch at once (a polynomial hash from prefix sums, then a
splitmix64 finaliser), never in a Python loop per n-gram. Hashes use fixed
constants, not `hash()`, so vectors are the same in every process and run.

The HTTP side is the stdlib's `ThreadingHTTPServer`: one thread per keep-alive
connection, which serves 64+ concurrent clients and lets the artificial
`latency_s` (for benchmarks) wait in its own thread without holding up others.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIMS",
    "MODEL_NAME",
    "EmbeddingRequest",
    "EmbeddingServer",
    "JSONRequestHandler",
    "RequestError",
    "ServingHTTPServer",
    "embed_texts",
    "embedding_reply",
    "error_body",
    "parse_embedding_request",
    "serve",
]

logger = logging.getLogger(__name__)

DIMS = 384
MODEL_NAME = "hash-384"
IDLE_TIMEOUT_S = 120.0  # longer than any client's keep-alive expiry, so clients close first

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

    gram_owner, gram_hashes = _gram_hashes(data, owner)
    word_owner, word_hashes = _word_hashes(data, owner, word)
    owners = np.concatenate([gram_owner, word_owner])
    hashes = np.concatenate([gram_hashes, word_hashes])
    weights = np.repeat([_GRAM_WEIGHT, _WORD_WEIGHT], [gram_hashes.size, word_hashes.size])
    signs = np.where(hashes & np.uint64(1), weights, -weights)  # signed hashing: noise cancels
    slots = owners * DIMS + ((hashes >> np.uint64(1)) % np.uint64(DIMS)).astype(np.int64)
    sums = np.bincount(slots, weights=signs, minlength=count * DIMS).astype(np.float64, copy=False)
    return _normalised(sums.reshape(count, DIMS)[:, :dims])


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
    """base**0 .. base**(size-1), modulo 2**64."""
    powers = np.ones(size, dtype=np.uint64)
    np.cumprod(np.full(size - 1, base, dtype=np.uint64), out=powers[1:])
    return powers


def _mix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: spreads similar inputs over all 64 bits."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _normalised(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class RequestError(ValueError):
    """A malformed API request: answered with HTTP 400 and an OpenAI-style body."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A checked POST /v1/embeddings body."""

    inputs: list[str]
    model: str
    encoding: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Check a request body the way the OpenAI API does; raises RequestError."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object")
    raw_input = payload.get("input")
    inputs = [raw_input] if isinstance(raw_input, str) else raw_input
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise RequestError(
            "'input' must be a string or a non-empty array of strings", param="input"
        )
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", param="model")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (
        type(dimensions) is not int or not 1 <= dimensions <= DIMS  # bool is not an int here
    ):
        raise RequestError(f"'dimensions' must be an integer in 1..{DIMS}", param="dimensions")
    return EmbeddingRequest(inputs, model, encoding, dimensions)


def embedding_reply(request: EmbeddingRequest) -> dict[str, Any]:
    """The OpenAI-shaped answer to `request`, embeddings included.

    Floats are the float32 values widened to Python floats, so the "float" and
    "base64" (little-endian float32) encodings decode to identical vectors.
    """
    vectors = embed_texts(request.inputs, dims=request.dimensions or DIMS)
    if request.encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        encoded: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        encoded = vectors.tolist()
    tokens = sum(len(text.split()) for text in request.inputs)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
        ],
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def error_body(
    message: str, *, kind: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ServingHTTPServer(ThreadingHTTPServer):
    """A threading server that can close cleanly under live keep-alive connections.

    The stdlib joins every handler thread on `server_close()`, and a handler
    waits on its idle keep-alive socket until the client hangs up; so `close()`
    shuts those sockets down first, which wakes each handler with end-of-file.
    """

    daemon_threads = True
    request_queue_size = 128  # 64+ clients connecting at once must not overflow the backlog

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.stopping = threading.Event()  # set at close: waits in handlers end early
        self.requests = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(address, handler)

    def count_request(self) -> int:
        """Count one request; returns the new total."""
        with self._lock:
            self.requests += 1
            return self.requests

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close(self) -> None:
        """Stop accepting, wake every handler and join their threads."""
        self.stopping.set()
        self.shutdown()
        with self._lock:
            live = list(self._connections)
        for connection in live:
            with contextlib.suppress(OSError):  # the client may have closed it first
                connection.shutdown(socket.SHUT_RDWR)
        self.server_close()


class JSONRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler with JSON helpers, logging through `logging`."""

    protocol_version = "HTTP/1.1"
    server_version = "pipeline-embeddings/0.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes
    timeout = IDLE_TIMEOUT_S
    server: ServingHTTPServer

    def read_body(self) -> bytes:
        """The request body; a missing Content-Length reads as empty."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(
        self, status: int, payload: object, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send `payload` (bytes as they are, anything else as JSON) with a length."""
        if isinstance(payload, bytes):
            body = payload
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def route(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


class _EmbeddingHTTPServer(ServingHTTPServer):
    latency_s = 0.0


class _EmbeddingHandler(JSONRequestHandler):
    server: _EmbeddingHTTPServer

    def do_GET(self) -> None:
        route = self.route()
        if route == "/health":
            self.send_json(200, {"status": "ok"})
        elif route == "/v1/models":
            model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "pipeline"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_json(404, error_body(f"no route {route!r}", kind="not_found"))

    def do_POST(self) -> None:
        body = self.read_body()
        if self.route() != "/v1/embeddings":
            self.send_json(404, error_body(f"no route {self.route()!r}", kind="not_found"))
            return
        self.server.count_request()
        if self.server.latency_s > 0:  # waits in this thread only; other requests go on
            self.server.stopping.wait(self.server.latency_s)
        try:
            request = parse_embedding_request(body)
        except RequestError as exc:
            self.send_json(400, error_body(str(exc), param=exc.param))
            return
        self.send_json(200, embedding_reply(request))


class EmbeddingServer:
    """The builtin server on a background thread: `with EmbeddingServer() as s: s.url`.

    Port 0 picks a free port. `requests` counts POST /v1/embeddings calls.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0) -> None:
        self._address = (host, port)
        self._latency_s = latency_s
        self._httpd: ServingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; returns once the socket is listening."""
        if self._httpd is not None:
            raise RuntimeError("the server is already started")
        httpd = _EmbeddingHTTPServer(self._address, _EmbeddingHandler)
        httpd.latency_s = self._latency_s
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection; idempotent."""
        if self._httpd is not None and self._thread is not None:
            self._httpd.close()
            self._thread.join()
            self._thread = None

    @property
    def url(self) -> str:
        """The API base URL, e.g. http://127.0.0.1:8000/v1."""
        host, port = self._bound()
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    @property
    def requests(self) -> int:
        return self._httpd.requests if self._httpd is not None else 0

    def _bound(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def __enter__(self) -> EmbeddingServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def serve(*, host: str, port: int, latency_s: float = 0.0) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and return.

    Must be called from the main thread (signal handlers can only be set there);
    the previous handlers are restored on return.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("embedding server got %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddingServer(host=host, port=port, latency_s=latency_s) as server:
            logger.info(
                "embedding server listening on %s (model %s, %d dims)", server.url, MODEL_NAME, DIMS
            )
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
