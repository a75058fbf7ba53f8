"""The builtin embedding server, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from stages.embed_server import DIMS, MODEL_NAME, EmbeddingServer, embed_texts

CHUNK = (
    "Qdrant stores each chunk's vector with its path, page and chunk number, so a "
    "search can point back at the PDF page the text came from. "
)


@pytest.fixture
def embed_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
def client(embed_server: EmbeddingServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embed_server.url, timeout=10) as http:
        yield http


def embed(client: httpx.Client, **payload: Any) -> dict[str, Any]:
    response = client.post("/embeddings", json={"model": "hash-384", **payload})
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reply_has_the_openai_shape(client: httpx.Client) -> None:
    reply = embed(client, input=["one text", "another text here"])
    assert reply["object"] == "list"
    assert reply["model"] == "hash-384"
    assert [d["index"] for d in reply["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in reply["data"])
    assert all(len(d["embedding"]) == DIMS for d in reply["data"])
    assert reply["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


def test_a_single_string_input_gets_one_embedding(client: httpx.Client) -> None:
    reply = embed(client, input="just one")
    assert len(reply["data"]) == 1


def test_float_and_base64_encodings_decode_to_the_same_vectors(client: httpx.Client) -> None:
    texts = [CHUNK, "café naïve 東京 text", ""]
    floats = embed(client, input=texts)["data"]
    encoded = embed(client, input=texts, encoding_format="base64")["data"]
    for as_float, as_base64 in zip(floats, encoded, strict=True):
        decoded = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
        assert np.array_equal(np.asarray(as_float["embedding"], dtype=np.float32), decoded)


def test_vectors_are_unit_length_and_match_embed_texts(client: httpx.Client) -> None:
    vector = np.asarray(embed(client, input=[CHUNK])["data"][0]["embedding"])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(vector, embed_texts([CHUNK])[0])


def test_dimensions_truncates_then_renormalises(client: httpx.Client) -> None:
    full = np.asarray(embed(client, input=[CHUNK])["data"][0]["embedding"])
    short = np.asarray(embed(client, input=[CHUNK], dimensions=64)["data"][0]["embedding"])
    assert short.shape == (64,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_a_query_scores_higher_against_text_sharing_its_words() -> None:
    query, related, unrelated = embed_texts(
        [
            "which pdf page and chunk number",
            CHUNK,
            "The hikers crossed the glacier at dawn and reached the hut before the storm.",
        ]
    )
    assert cosine(query, related) > cosine(query, unrelated) + 0.1


def test_embedding_ignores_case_and_punctuation_runs() -> None:
    a, b = embed_texts(["Hello, World!", "hello    world"])
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-6)


def test_embeddings_are_deterministic_across_calls_and_batches() -> None:
    texts = [CHUNK, "second text", "third"]
    together = embed_texts(texts)
    assert np.array_equal(together, embed_texts(texts))
    assert np.array_equal(together[1], embed_texts(["second text"])[0])


def test_hash_384_vectors_stay_what_they_were() -> None:
    """Collections built by hash-384 must match the queries of later versions: a
    change to the hashing (or a faster way to compute it) must not move a vector."""
    v = embed_texts(["Qdrant Edge stores the chunks; pypdf reads the pages."])[0]
    assert np.count_nonzero(v) == 49
    assert v[7] == pytest.approx(0.51533, abs=1e-5)
    assert v[67] == pytest.approx(-0.32208, abs=1e-5)
    assert v[84] == pytest.approx(0.25766, abs=1e-5)


def test_a_huge_batch_leaves_no_huge_table_behind() -> None:
    """The server keeps its hashing tables between requests, but only up to a size:
    one request of megabytes must not pin megabytes for the server's life."""
    import stages.hash_model as hash_model

    embed_texts(["a usual chunk"])  # kept: the tables later requests reuse
    huge = ["word " * 400_000]  # 2 MB of text: tables of 16 MB each
    assert np.array_equal(embed_texts(huge), embed_texts(huge))
    kept = hash_model._POWERS.values()
    assert kept and all(table.size <= hash_model._KEPT for table in kept)


def test_embeddings_are_the_same_in_another_process() -> None:
    code = (
        "import sys; from stages.embed_server import embed_texts; "
        f"sys.stdout.buffer.write(embed_texts([{CHUNK!r}]).tobytes())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, timeout=60
    ).stdout
    assert np.array_equal(np.frombuffer(out, dtype=np.float32), embed_texts([CHUNK])[0])


def test_text_without_words_embeds_as_zeros() -> None:
    assert not embed_texts(["", " ... !"]).any()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "input"),
        (b'{"model": "m", "input": []}', "input"),
        (b'{"model": "m", "input": [[1, 2, 3]]}', "input"),
        (b'{"input": "x"}', "model"),
        (b'{"model": "m", "input": "x", "encoding_format": "hex"}', "encoding_format"),
        (b'{"model": "m", "input": "x", "dimensions": 385}', "dimensions"),
        (b'{"model": "m", "input": "x", "dimensions": 0}', "dimensions"),
        (b'{"model": "m", "input": "x", "dimensions": true}', "dimensions"),
    ],
)
def test_malformed_request_gets_400_with_an_openai_error(
    client: httpx.Client, body: bytes, param: str | None
) -> None:
    response = client.post(
        "/embeddings", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == param


def test_models_lists_hash_384(client: httpx.Client) -> None:
    models = client.get("/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_health_answers_ok(embed_server: EmbeddingServer) -> None:
    root = embed_server.url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}


def test_unknown_route_gets_404(client: httpx.Client) -> None:
    assert client.post("/completions", json={}).status_code == 404


def test_requests_are_counted_over_one_keepalive_connection(
    embed_server: EmbeddingServer, client: httpx.Client
) -> None:
    ports = set()
    for _ in range(3):
        response = client.post("/embeddings", json={"model": "hash-384", "input": "x"})
        ports.add(response.extensions["network_stream"].get_extra_info("client_addr"))
    assert embed_server.requests == 3
    assert len(ports) == 1


async def test_64_keepalive_connections_are_served_concurrently() -> None:
    """With 0.5 s of latency each, 64 requests done one after another take 32 s."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with EmbeddingServer(latency_s=0.5) as server:
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http:

            async def one(i: int) -> int:
                reply = await http.post("/embeddings", json={"model": "hash-384", "input": f"t{i}"})
                return reply.status_code

            async with asyncio.timeout(10):
                for _ in range(2):  # the second round reuses the kept-alive connections
                    statuses = await asyncio.gather(*(one(i) for i in range(64)))
                    assert statuses == [200] * 64
        assert server.requests == 128


def test_close_returns_with_idle_keepalive_connections_open() -> None:
    server = EmbeddingServer()
    server.start()
    with httpx.Client(base_url=server.url) as http:
        http.post("/embeddings", json={"model": "hash-384", "input": "x"})
        server.close()  # a joined handler thread would block here forever
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/embeddings", json={"model": "hash-384", "input": "x"})


def test_serve_listens_until_sigterm() -> None:
    code = (
        "import logging; from stages.embed_server import serve; "
        "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "serve(host='127.0.0.1', port=0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"listening on (http://\S+/v1)", line)
        assert found, line
        reply = httpx.post(f"{found[1]}/embeddings", json={"model": "hash-384", "input": "hi"})
        assert reply.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


class _Broken:
    """A served model whose computation fails (a GPU out of memory, say)."""

    name = "hash-384"
    dims = 384
    window = None

    def embed(self, texts: list[str], dims: int | None) -> Any:
        raise RuntimeError("CUDA out of memory")

    def close(self) -> None:
        return None


def test_a_failing_model_answers_500_and_the_server_goes_on() -> None:
    with EmbeddingServer(model=_Broken()) as server:
        reply = httpx.post(f"{server.url}/embeddings", json={"model": "hash-384", "input": "x"})
        assert reply.status_code == 500
        assert "CUDA out of memory" in reply.json()["error"]["message"]
        assert httpx.get(f"{server.url.removesuffix('/v1')}/health").status_code == 200


def test_served_name_is_the_name_the_server_answers_to() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-embeddings", "--port", str(port),
         "--served-name", "text-embedding-3-small"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        while "listening" not in (line := proc.stderr.readline()):  # its start-up line
            assert line, "the server exited before listening"
        url = f"http://127.0.0.1:{port}/v1"
        named = {"model": "text-embedding-3-small", "input": "x"}
        assert httpx.post(f"{url}/embeddings", json=named).status_code == 200
        hashed = {"model": "hash-384", "input": "x"}
        assert httpx.post(f"{url}/embeddings", json=hashed).status_code == 404
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == [named["model"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _minor_faults(pid: int) -> int:
    """Pages the kernel has had to map for `pid` so far (/proc/PID/stat, minflt)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[7])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reads /proc; pads glibc's heap")
def test_serve_embeddings_reuses_its_heap_from_request_to_request() -> None:
    # Without the heap pad (pipeline.heap) glibc returns hash-384's freed numpy
    # temporaries to the kernel after every request, and the next request faults
    # ~1,400 fresh pages back in: half of the server's CPU, measured.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-embeddings", "--port", str(port)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    texts = [f"{i} {CHUNK * 7}" for i in range(64)]  # a default batch of ~1,100-char chunks
    try:
        assert proc.stderr is not None
        while "listening" not in (line := proc.stderr.readline()):
            assert line, "the server exited before listening"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=30) as http:
            request = {"model": "hash-384", "input": texts, "encoding_format": "base64"}
            for _ in range(3):  # the heap grows to what a request needs
                assert http.post("/embeddings", json=request).status_code == 200
            before = _minor_faults(proc.pid)
            for _ in range(20):
                assert http.post("/embeddings", json=request).status_code == 200
            per_request = (_minor_faults(proc.pid) - before) / 20
        assert per_request < 100, f"{per_request:.0f} pages faulted in per request"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
