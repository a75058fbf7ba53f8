"""The capacity-limited test server: slots, FIFO queue, abandoned requests, outages."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from stages.embed_server import DIMS, embed_texts
from tests.capacity_server import CapacityServer

SLACK = 0.95  # timer waits may end a hair early by the monotonic clock


def post(url: str, texts: list[str], *, timeout: float = 10.0, **extra: Any) -> httpx.Response:
    payload = {"model": "any-model", "input": texts, **extra}
    return httpx.post(f"{url}/embeddings", json=payload, timeout=timeout)


def finished_at(url: str, texts: list[str]) -> tuple[httpx.Response, float]:
    response = post(url, texts)
    return response, time.monotonic()


def test_one_slot_computes_concurrent_requests_one_after_another() -> None:
    per_text = 0.15
    with CapacityServer(slots=1, per_text_s=per_text) as server, ThreadPoolExecutor(2) as pool:
        sent = time.monotonic()
        first = pool.submit(finished_at, server.url, ["first"])
        assert server.wait_for_requests(1)  # computing: it arrived at an idle server
        second = pool.submit(finished_at, server.url, ["second"])
        assert server.wait_for_requests(2)  # queued behind the first
        assert server.max_queued == 1
        (reply1, done1), (reply2, done2) = first.result(), second.result()
    assert reply1.status_code == reply2.status_code == 200
    assert done1 - sent >= per_text * SLACK
    assert done2 - sent >= 2 * per_text * SLACK  # its compute began when the first's ended
    assert server.busy_seconds >= 2 * per_text * SLACK
    assert (server.requests, server.answered, server.abandoned) == (2, 2, 0)


def test_two_slots_compute_two_requests_at_once() -> None:
    with CapacityServer(slots=2, per_text_s=0.1) as server, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, server.url, ["first"])
        assert server.wait_for_requests(1)
        second = pool.submit(post, server.url, ["second"])
        assert first.result().status_code == second.result().status_code == 200
    assert server.max_queued == 0
    assert server.answered == 2


def test_the_queue_is_first_in_first_out() -> None:
    with CapacityServer(slots=1, per_text_s=0.05) as server, ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(post, server.url, ["hold"] * 10)  # the slot, for 0.5 s
        assert server.wait_for_requests(1)
        order: list[int] = []
        lock = threading.Lock()

        def call(number: int) -> None:
            assert post(server.url, [f"text {number}"]).status_code == 200
            with lock:
                order.append(number)

        futures: list[Future[None]] = []
        for number in range(4):  # each arrives only after the one before is in line
            futures.append(pool.submit(call, number))
            assert server.wait_for_requests(number + 2)
        assert blocker.result().status_code == 200
        for future in futures:
            future.result()
    assert order == [0, 1, 2, 3]
    assert server.max_queued == 4


def test_texts_computed_counts_inputs_and_bad_requests_take_no_slot() -> None:
    per_text = 0.01
    with CapacityServer(per_text_s=per_text) as server:
        assert post(server.url, ["a", "b", "c"]).status_code == 200
        assert post(server.url, ["d", "e"]).status_code == 200
        bad = httpx.post(f"{server.url}/embeddings", json={"model": "m", "input": []})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "input"
    assert (server.requests, server.texts_computed, server.answered) == (3, 5, 2)
    assert server.busy_seconds >= 5 * per_text * SLACK


def test_a_client_that_timed_out_is_abandoned_but_its_texts_are_computed() -> None:
    with CapacityServer(slots=1, per_text_s=0.3) as server:
        with (
            httpx.Client(timeout=0.05) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.post(f"{server.url}/embeddings", json={"model": "m", "input": ["gone"]})
        # The client's socket is closed now; the request is still computing.
        assert server.wait_for_requests(1)
        follower = post(server.url, ["next"])  # FIFO: computed after the abandoned one
        assert follower.status_code == 200
        assert (server.requests, server.texts_computed) == (2, 2)
        assert (server.answered, server.abandoned) == (1, 1)


def test_models_reports_max_input_tokens_when_set() -> None:
    with CapacityServer(max_input_tokens=512, model="bge-small") as server:
        models = httpx.get(f"{server.url}/models")
        assert models.status_code == 200
        assert models.json() == {
            "object": "list",
            "data": [
                {"id": "bge-small", "object": "model", "owned_by": "tests", "max_input_tokens": 512}
            ],
        }
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200
    with CapacityServer() as server:
        (model,) = httpx.get(f"{server.url}/models").json()["data"]
        assert model == {"id": "capacity-384", "object": "model", "owned_by": "tests"}


def test_stop_listening_refuses_connections_and_start_listening_serves_the_same_port() -> None:
    with CapacityServer(slots=1, per_text_s=0.02) as server, ThreadPoolExecutor(2) as pool:
        port = server.port
        with httpx.Client(base_url=server.url, timeout=10) as client:  # keep-alive
            assert client.post("/embeddings", json={"model": "m", "input": "x"}).status_code == 200
            computing = pool.submit(post, server.url, ["long"] * 200)  # 4 s unless dropped
            assert server.wait_for_requests(2)
            queued = pool.submit(post, server.url, ["queued"])
            assert server.wait_for_requests(3)

            server.stop_listening()
            for dropped in (computing, queued):  # no reply, and at once
                with pytest.raises(httpx.TransportError):
                    dropped.result(timeout=1.5)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            with pytest.raises(httpx.ConnectError):  # the pooled connection was dropped too
                client.post("/embeddings", json={"model": "m", "input": "x"})

            server.start_listening()
            assert server.port == port
            assert client.post("/embeddings", json={"model": "m", "input": "y"}).status_code == 200
        assert (server.requests, server.answered, server.texts_computed) == (4, 2, 2)


def test_close_wakes_waiters_and_drops_requests_at_once() -> None:
    server = CapacityServer(slots=1, per_text_s=30.0)
    with ThreadPoolExecutor(3) as pool:
        computing = pool.submit(post, server.url, ["a"], timeout=60)
        assert server.wait_for_requests(1)
        queued = pool.submit(post, server.url, ["b"], timeout=60)
        assert server.wait_for_requests(2)
        waiter = pool.submit(server.wait_for_requests, 99, timeout=60)
        server.close()
        server.close()  # idempotent
        assert waiter.result(timeout=1.5) is False
        for dropped in (computing, queued):
            with pytest.raises(httpx.TransportError):
                dropped.result(timeout=1.5)
    assert server.texts_computed == 0
    with pytest.raises(RuntimeError):
        server.start_listening()


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_replies_decode_to_the_builtin_vectors(encoding: str) -> None:
    texts = ["Qdrant stores each chunk's vector.", "café naïve 東京 text", ""]
    with CapacityServer(per_text_s=0.0) as server:
        reply = post(server.url, texts, encoding_format=encoding)
    assert reply.status_code == 200
    data = reply.json()["data"]
    if encoding == "base64":
        vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
    else:
        vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
    assert vectors.shape == (3, DIMS)
    assert np.array_equal(vectors, embed_texts(texts))
