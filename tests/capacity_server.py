"""A capacity-limited OpenAI-compatible embedding server on 127.0.0.1, for tests and benchmarks.

The builtin server answers as fast as numpy allows, and `FaultServer` scripts one
fault at a time; neither behaves like a real model server on a CPU (infinity-emb,
TEI, Ollama), whose throughput is fixed and whose queue is where latency comes
from. This one computes at most `slots` requests at a time, each holding its
slot for `per_text_s` seconds per input text, and queues every other request in
an unbounded first-in, first-out queue:

    with CapacityServer(slots=2, per_text_s=0.01) as server:
        ...  # point the pipeline at server.url
        server.max_queued, server.busy_seconds, server.abandoned

As on a real server, a request whose client has gone away (timed out, closed its
socket) is still computed when its turn comes; it is counted as abandoned and
gets no reply, so a client that retries on timeout visibly wastes capacity.
`stop_listening()` / `start_listening()` take the server away (connections
refused, open ones dropped) and bring it back on the same port.

Replies are real (the builtin server's embeddings). Tests synchronise on
`wait_for_requests(n, timeout=...)`, never on sleeps, and `close()` ends every
computation and queue wait early, so the server always shuts down at once.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque
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

__all__ = ["CapacityServer"]

_Outcome = Literal["answer", "abandoned", "dropped"]
_CLOSE_WAIT_S = 5.0  # the most close() waits for handlers to leave (they are woken at once)


class _CapacityHTTPServer(ServingHTTPServer):
    controller: CapacityServer


class _CapacityHandler(JSONRequestHandler):
    server: _CapacityHTTPServer

    def do_GET(self) -> None:
        route = self.route()
        if route == "/health":
            self.send_json(200, {"status": "ok"})
        elif route == "/v1/models":
            self.send_json(200, self.server.controller._models())
        else:
            self.send_json(404, error_body("not found", kind="not_found"))

    def do_POST(self) -> None:
        body = self.read_body()
        if self.route() != "/v1/embeddings":
            self.send_json(404, error_body("not found", kind="not_found"))
            return
        controller = self.server.controller
        try:
            request = parse_embedding_request(body)
        except RequestError as exc:
            controller._count()  # a bad request is answered at once: it takes no slot
            self.send_json(400, error_body(str(exc), param=exc.param))
            return
        try:
            outcome = controller._compute(self.server, self.connection, len(request.inputs))
            if outcome != "answer":
                self.close_connection = True  # returns; the socket closes unanswered
                return
            try:
                self.send_json(200, embedding_reply(request))
            except OSError:
                self.close_connection = True  # gone between the check and the write
                controller._write_failed()
        finally:
            controller._leave()


def _client_gone(connection: socket.socket) -> bool:
    """Whether the peer has closed (or reset) the connection: readable, yet no data."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or the socket is already closed here
        return True


class CapacityServer:
    """The slot-limited server; use as `with CapacityServer() as server: server.url`.

    All counters are guarded by one lock; read them freely (they only grow).
    """

    def __init__(
        self,
        *,
        slots: int = 1,
        per_text_s: float = 0.005,
        max_input_tokens: int | None = None,
        port: int = 0,
        model: str = "capacity-384",
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if per_text_s < 0:
            raise ValueError(f"per_text_s must not be negative, got {per_text_s}")
        self._slots = slots
        self._per_text_s = per_text_s
        self._max_input_tokens = max_input_tokens
        self._model = model
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # tickets of waiting requests, oldest first
        self._computing = 0
        self._in_flight = 0  # valid POSTs between arrival and the end of their handler
        self._closed = False
        self.requests = 0  # POST /v1/embeddings received, bad ones included
        self.texts_computed = 0  # inputs computed, abandoned requests' included
        self.abandoned = 0  # computed, but the client was gone when the reply was due
        self.answered = 0  # answered 200
        self.max_queued = 0  # the most requests waiting (not computing) at once
        self.busy_seconds = 0.0  # total seconds slots spent computing
        self._httpd: _CapacityHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self.start_listening()

    @property
    def url(self) -> str:
        """The API base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def port(self) -> int:
        """The bound port; the same after `stop_listening()` and `start_listening()`."""
        return self._port

    def wait_for_requests(self, count: int, *, timeout: float = 10.0) -> bool:
        """Wait until `count` requests have arrived (and, if valid, been queued or
        started); False if `timeout` passed or the server closed first."""
        with self._cond:
            self._cond.wait_for(lambda: self.requests >= count or self._closed, timeout=timeout)
            return self.requests >= count

    def stop_listening(self) -> None:
        """Go away: close the listening socket and every open connection, so connects
        are refused; queued and computing requests are dropped without a reply."""
        with self._cond:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
            if httpd is None:
                return
            httpd.stopping.set()  # ends computations, and queue waits with the notify
            self._cond.notify_all()
        httpd.close()
        if thread is not None:
            thread.join()

    def start_listening(self) -> None:
        """Listen again on the same port; does nothing while listening."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is closed")
            if self._httpd is not None:
                return
            httpd = _CapacityHTTPServer(("127.0.0.1", self._port), _CapacityHandler)
            httpd.controller = self
            self._port = int(httpd.server_address[1])
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop serving, drop every request and wake every waiter; idempotent.

        Waits (briefly: they are woken) for the handlers of dropped requests to
        leave, so the counters are final once it returns.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.stop_listening()
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=_CLOSE_WAIT_S)

    def __enter__(self) -> CapacityServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _models(self) -> dict[str, Any]:
        model: dict[str, Any] = {"id": self._model, "object": "model", "owned_by": "tests"}
        if self._max_input_tokens is not None:
            model["max_input_tokens"] = self._max_input_tokens
        return {"object": "list", "data": [model]}

    def _count(self) -> None:
        with self._cond:
            self.requests += 1
            self._cond.notify_all()

    def _compute(self, httpd: ServingHTTPServer, connection: socket.socket, texts: int) -> _Outcome:
        """Queue for a slot, hold it for `texts * per_text_s`, and say what to do next.

        Arrival is counted and queued in one step, so once `wait_for_requests(n)`
        returns, the n-th request is in line. The slot is given back in the same
        step as the outcome is counted, so the next in line starts only after.
        """
        stopping = httpd.stopping  # set when this listener goes away, or at close
        with self._cond:
            self.requests += 1
            self._in_flight += 1
            self._cond.notify_all()
            if stopping.is_set():
                return "dropped"
            if self._computing >= self._slots or self._queue:
                ticket = object()
                self._queue.append(ticket)
                self.max_queued = max(self.max_queued, len(self._queue))
                self._cond.wait_for(
                    lambda: (
                        stopping.is_set()
                        or (self._computing < self._slots and self._queue[0] is ticket)
                    )
                )
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may take another free slot
                if stopping.is_set():
                    return "dropped"
            self._computing += 1
        started = time.monotonic()
        finished = not stopping.wait(texts * self._per_text_s)
        elapsed = time.monotonic() - started
        with self._cond:
            self._computing -= 1
            self.busy_seconds += elapsed
            self._cond.notify_all()
            if not finished:
                return "dropped"
            self.texts_computed += texts
            if _client_gone(connection):
                self.abandoned += 1
                return "abandoned"
            self.answered += 1  # before the write: the client may look as soon as it reads
            return "answer"

    def _write_failed(self) -> None:
        with self._cond:
            self.answered -= 1
            self.abandoned += 1

    def _leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def __repr__(self) -> str:
        return (
            f"CapacityServer(url={self.url!r}, slots={self._slots}, "
            f"requests={self.requests}, answered={self.answered}, abandoned={self.abandoned})"
        )
