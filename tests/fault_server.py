"""A fault-injecting OpenAI-compatible embedding server on 127.0.0.1, for tests.

Good replies are real (the builtin server's embeddings); faults are scripted per
request before the call that should meet them:

    server.reply_next(429, headers={"Retry-After": "7"})
    server.drop_next()          # close the connection without a reply
    server.garbage_next()       # 200 with a body that is not an embeddings reply
    server.hang() ... server.release()
    server.reject_input("poison")   # 400 for any request containing it

Scripted faults are consumed first in, first out, one per POST /v1/embeddings.
Tests synchronise on `wait_for_requests(n, timeout=...)`, never on sleeps, and
`close()` releases hung requests so the server always shuts down.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from stages.embed_server import (
    JSONRequestHandler,
    RequestError,
    ServingHTTPServer,
    embedding_reply,
    error_body,
    parse_embedding_request,
)

__all__ = ["FaultServer"]

GarbageKind = Literal["not_json", "wrong_shape", "short"]


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: Literal["reply", "drop", "garbage"]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    garbage: GarbageKind = "not_json"


class _FaultHTTPServer(ServingHTTPServer):
    controller: FaultServer


class _FaultHandler(JSONRequestHandler):
    server: _FaultHTTPServer

    def do_GET(self) -> None:
        if self.route() == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, error_body("not found", kind="not_found"))

    def do_POST(self) -> None:
        body = self.read_body()
        if self.route() != "/v1/embeddings":
            self.send_json(404, error_body("not found", kind="not_found"))
            return
        controller = self.server.controller
        fault = controller._arrive(self.headers.get("Authorization"))
        try:
            self._answer(controller, fault, body)
        except OSError:
            self.close_connection = True  # the client gave up (e.g. timed out while hung)

    def _answer(self, controller: FaultServer, fault: _Fault | None, body: bytes) -> None:
        if fault is not None and fault.kind == "drop":
            self.close_connection = True  # the handler returns; the socket closes unanswered
            return
        if fault is not None and fault.kind == "reply" and (fault.status != 200 or fault.body):
            self.send_json(fault.status, _error_payload(fault), headers=fault.headers)
            return
        try:
            request = parse_embedding_request(body)
        except RequestError as exc:
            self.send_json(400, error_body(str(exc), param=exc.param))
            return
        rejected = controller._rejected(request.inputs)
        if rejected is not None:
            message = f"input {rejected!r} is not allowed"
            self.send_json(400, error_body(message, param="input"))
            return
        reply = embedding_reply(request)
        if fault is not None and fault.kind == "garbage":
            self.send_json(200, _garbage(fault.garbage, reply))
            return
        controller._embedded(len(request.inputs))  # before the reply: the client may look next
        self.send_json(200, reply)


def _error_payload(fault: _Fault) -> object:
    if fault.body is not None:
        return fault.body
    return error_body(f"injected HTTP {fault.status}", kind="injected_error")


def _garbage(kind: GarbageKind, reply: dict[str, Any]) -> object:
    if kind == "not_json":
        return b"<html><body>502 Bad Gateway</body></html>"
    if kind == "wrong_shape":
        return {"object": "list", "results": reply["data"]}
    return {**reply, "data": reply["data"][:-1]}  # "short": one embedding missing


class FaultServer:
    """The scriptable server; use as `with FaultServer() as server: server.url`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._script: deque[_Fault] = deque()
        self._reject: list[str] = []
        self._hung = False
        self._closing = False
        self.requests = 0  # POST /v1/embeddings received, faults included
        self.inputs_embedded = 0  # inputs answered with a good 200
        self.auth_headers: list[str | None] = []  # Authorization of each request, in order
        self._httpd = _FaultHTTPServer(("127.0.0.1", 0), _FaultHandler)
        self._httpd.controller = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """The API base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def reply_next(
        self,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests with `status` (an error body by default)."""
        raw = body.encode() if isinstance(body, str) else body
        self._queue(_Fault("reply", status, dict(headers or {}), raw), times)

    def drop_next(self, times: int = 1) -> None:
        """Close the connection of the next `times` requests without a reply."""
        self._queue(_Fault("drop"), times)

    def garbage_next(self, times: int = 1, *, kind: GarbageKind = "not_json") -> None:
        """Answer 200 with a body that is not JSON, has no "data", or is one short."""
        self._queue(_Fault("garbage", garbage=kind), times)

    def reject_input(self, text_substring: str) -> None:
        """From now on, answer 400 to any request with an input containing this."""
        with self._cond:
            self._reject.append(text_substring)

    def hang(self) -> None:
        """Hold every request from now on until `release()` (or `close()`)."""
        with self._cond:
            self._hung = True

    def release(self) -> None:
        """Let held requests (and later ones) go on."""
        with self._cond:
            self._hung = False
            self._cond.notify_all()

    def wait_for_requests(self, count: int, *, timeout: float = 10.0) -> bool:
        """Wait until `count` requests have arrived; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.requests >= count, timeout=timeout)

    def close(self) -> None:
        """Release hung requests, stop serving and join every handler; idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._httpd.close()
            self._thread.join()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _queue(self, fault: _Fault, times: int) -> None:
        with self._cond:
            self._script.extend([fault] * times)

    def _arrive(self, authorization: str | None) -> _Fault | None:
        """Count a request, hold it while hung, and hand it the next fault."""
        with self._cond:
            self.requests += 1
            self.auth_headers.append(authorization)
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._hung or self._closing)
            if self._closing:
                return _Fault("drop")  # shutting down: a held request gets no reply
            return self._script.popleft() if self._script else None

    def _rejected(self, inputs: list[str]) -> str | None:
        with self._cond:
            return next((s for s in self._reject for text in inputs if s in text), None)

    def _embedded(self, count: int) -> None:
        with self._cond:
            self.inputs_embedded += count
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"FaultServer(url={self.url!r}, requests={self.requests})"
