"""The builtin OpenAI-compatible embedding server: `pipeline serve-embeddings`.

With `--model all-MiniLM-L6-v2` (or any sentence-transformers model on this
machine, see `stages.local_model`) it serves that model, batching the requests
that arrive together (`stages.served_model`): one model box can feed many
pipelines through their unchanged `openai.embed` stage. It answers only to the
name of the model it serves (`/v1/models` lists it, with its window), so a
pipeline naming another model gets a 404 instead of vectors from the wrong one.

Without `--model` it serves `hash-384`, which needs no model, so the pipeline can
be run, tested and benchmarked end to end on any machine: it finds chunks that
share a query's words, not its meaning (`stages.hash_model`).

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
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from pipeline.vector_space import same_model
from stages.hash_model import DIMS, MODEL_NAME, embed_texts
from stages.served_model import HashModel, ServedModel, UnsupportedDimensions

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

IDLE_TIMEOUT_S = 120.0  # longer than any client's keep-alive expiry, so clients close first


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


def parse_embedding_request(body: bytes, *, max_dims: int = DIMS) -> EmbeddingRequest:
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
        type(dimensions) is not int or not 1 <= dimensions <= max_dims  # bool is not an int here
    ):
        raise RequestError(f"'dimensions' must be an integer in 1..{max_dims}", param="dimensions")
    return EmbeddingRequest(inputs, model, encoding, dimensions)


def embedding_reply(
    request: EmbeddingRequest, vectors: npt.NDArray[np.float32] | None = None
) -> dict[str, Any]:
    """The OpenAI-shaped answer to `request`, with `vectors` (default: the hash model's).

    Floats are the float32 values widened to Python floats, so the "float" and
    "base64" (little-endian float32) encodings decode to identical vectors.
    """
    if vectors is None:
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
    model: ServedModel = HashModel()


class _EmbeddingHandler(JSONRequestHandler):
    server: _EmbeddingHTTPServer

    def do_GET(self) -> None:
        route = self.route()
        if route == "/health":
            self.send_json(200, {"status": "ok"})
        elif route == "/v1/models":
            served = self.server.model
            model: dict[str, Any] = {
                "id": served.name,
                "object": "model",
                "created": 0,
                "owned_by": "pipeline",
            }
            if served.window is not None:
                model["max_input_tokens"] = served.window
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
        served = self.server.model
        try:
            request = parse_embedding_request(body, max_dims=served.dims)
        except RequestError as exc:
            self.send_json(400, error_body(str(exc), param=exc.param))
            return
        if not same_model(request.model, served.name):
            message = (
                f"The model {request.model!r} does not exist; this server serves {served.name!r}"
            )
            body_ = error_body(message, param="model")
            body_["error"]["code"] = "model_not_found"
            self.send_json(404, body_)
            return
        try:
            vectors = served.embed(request.inputs, request.dimensions)
        except UnsupportedDimensions as exc:
            self.send_json(400, error_body(str(exc), param="dimensions"))
            return
        except Exception as exc:  # noqa: BLE001 - the model failed: say so, keep serving
            logger.exception("embedding failed")
            self.send_json(500, error_body(f"the model failed: {exc}", kind="server_error"))
            return
        self.send_json(200, embedding_reply(request, vectors))


class EmbeddingServer:
    """The builtin server on a background thread: `with EmbeddingServer() as s: s.url`.

    Port 0 picks a free port. `requests` counts POST /v1/embeddings calls.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        model: ServedModel | None = None,
    ) -> None:
        self._address = (host, port)
        self._latency_s = latency_s
        self.model: ServedModel = model or HashModel()
        self._httpd: ServingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; returns once the socket is listening."""
        if self._httpd is not None:
            raise RuntimeError("the server is already started")
        httpd = _EmbeddingHTTPServer(self._address, _EmbeddingHandler)
        httpd.latency_s = self._latency_s
        httpd.model = self.model
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


def serve(
    *, host: str, port: int, latency_s: float = 0.0, model: ServedModel | None = None
) -> None:
    """Serve `model` (default: the hash model) until SIGINT or SIGTERM, then close
    connections and the model, and return.

    Must be called from the main thread (signal handlers can only be set there);
    the previous handlers are restored on return.
    """
    served = model or HashModel()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("embedding server got %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddingServer(host=host, port=port, latency_s=latency_s, model=served) as server:
            logger.info(
                "embedding server listening on %s (model %s, %d dims)",
                server.url,
                served.name,
                served.dims,
            )
            stop.wait()
    finally:
        served.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
