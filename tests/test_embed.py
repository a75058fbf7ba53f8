"""The `openai.embed` stage against real servers on 127.0.0.1: the builtin one and
the fault-injecting one."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import numpy as np
import pytest

from pipeline.errors import (
    FatalError,
    PermanentError,
    PipelineError,
    StageError,
    TransientError,
)
from pipeline.stage import Item, QueryEmbedder
from stages.embed import Embed, parse_retry_after
from stages.embed_server import EmbeddingRequest, EmbeddingServer, embed_texts, embedding_reply
from tests.capacity_server import CapacityServer
from tests.fault_server import FaultServer

KEY_ENV = "EMBEDDING_API_KEY"
SECRET = "sk-test-5f1b9c0e-never-print-me"


def make_stage(url: str, **params: Any) -> Embed:
    """The stage with its defaults filled in, as the config loader would."""
    filled = {key: param.default for key, param in Embed.PARAMS.items()}
    filled.update(url=url, model="hash-384", **params)
    return Embed(filled, name="embed", concurrency=4)


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def embed_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as server:
        yield server


@pytest.fixture
async def faulty(fault_server: FaultServer) -> AsyncIterator[Embed]:
    """The stage on the fault server, quick to time out."""
    stage = make_stage(fault_server.url, request_timeout_s=5.0)
    await stage.open()
    yield stage
    await stage.close()


def chunks(*texts: str, doc: str = "a.pdf") -> list[Item]:
    return [Item(doc, {"path": doc, "chunk": i, "text": t}) for i, t in enumerate(texts)]


async def test_vectors_are_attached_in_order_for_a_multi_document_batch(
    embed_server: EmbeddingServer,
) -> None:
    items = chunks("alpha beta", "gamma", doc="a.pdf") + chunks("delta epsilon", doc="b.pdf")
    stage = make_stage(embed_server.url)
    await stage.open()
    try:
        out = await stage.process(items)
    finally:
        await stage.close()
    assert embed_server.requests == 1
    assert [(i.doc, i.data["text"]) for i in out] == [(i.doc, i.data["text"]) for i in items]
    expected = embed_texts([i.data["text"] for i in items])
    assert np.array_equal(np.asarray([i.data["vector"] for i in out], dtype=np.float32), expected)
    # float32 rows from the reply to the store, never lists of Python floats
    vector = out[0].data["vector"]
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (384,)
    assert out[0].data["chunk"] == 0 and out[2].data["path"] == "b.pdf"


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_both_encodings_give_the_same_vectors(
    embed_server: EmbeddingServer, encoding: str
) -> None:
    stage = make_stage(embed_server.url, encoding=encoding, dimensions=32)
    await stage.open()
    try:
        vectors = await stage.embed_texts(["some query text"])
    finally:
        await stage.close()
    assert np.array_equal(
        np.asarray(vectors, dtype=np.float32), embed_texts(["some query text"], dims=32)
    )


async def test_embed_texts_serves_as_the_query_embedder(embed_server: EmbeddingServer) -> None:
    stage = make_stage(embed_server.url)
    assert isinstance(stage, QueryEmbedder)
    await stage.open()
    try:
        assert await stage.embed_texts([]) == []
        [vector] = await stage.embed_texts(["query"])
    finally:
        await stage.close()
    assert len(vector) == 384
    assert embed_server.requests == 1


async def test_batch_size_comes_from_the_batch_param() -> None:
    assert make_stage("http://127.0.0.1:1/v1", batch=16).batch_size == 16
    assert make_stage("http://127.0.0.1:1/v1").batch_size == 64


def test_check_flags_a_url_ending_in_embeddings() -> None:
    [problem] = Embed.check({"url": "http://127.0.0.1:8000/v1/embeddings", "model": "m"})
    assert problem.key == "url"
    assert Embed.check({"url": "http://127.0.0.1:8000/v1", "model": "m"}) == []


async def test_bearer_token_is_sent_when_api_key_env_is_set(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    stage = make_stage(fault_server.url, api_key_env=KEY_ENV)
    await stage.open()
    try:
        await stage.process(chunks("hello"))
    finally:
        await stage.close()
    assert fault_server.auth_headers == [f"Bearer {SECRET}"]
    assert fault_server.inputs_embedded == 1


async def test_no_authorization_header_without_api_key_env(
    faulty: Embed, fault_server: FaultServer
) -> None:
    await faulty.process(chunks("hello"))
    assert fault_server.auth_headers == [None]


async def test_open_fails_fatally_when_the_key_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(FatalError, match=KEY_ENV):
        await make_stage("http://127.0.0.1:1/v1", api_key_env=KEY_ENV).open()


async def test_429_with_retry_after_seconds_cools_the_pool(
    faulty: Embed, fault_server: FaultServer
) -> None:
    fault_server.reply_next(429, headers={"Retry-After": "7"})
    with pytest.raises(TransientError) as caught:
        await faulty.process(chunks("hello"))
    assert caught.value.reason == "http_429"
    assert caught.value.retry_after == 7
    assert caught.value.cool_pool


async def test_429_with_retry_after_as_an_http_date(
    faulty: Embed, fault_server: FaultServer
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    fault_server.reply_next(429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    with pytest.raises(TransientError) as caught:
        await faulty.process(chunks("hello"))
    assert caught.value.retry_after is not None
    assert 100 < caught.value.retry_after <= 121


def test_parse_retry_after_reads_seconds_dates_and_rejects_junk() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0
    assert parse_retry_after("-3", now=now) == 0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now=now) is None


@pytest.mark.parametrize("status", [503, 500, 502, 408])
async def test_5xx_and_408_are_transient(
    faulty: Embed, fault_server: FaultServer, status: int
) -> None:
    fault_server.reply_next(status, headers={"Retry-After": "2"})
    with pytest.raises(TransientError) as caught:
        await faulty.process(chunks("hello"))
    assert caught.value.reason == f"http_{status}"
    assert caught.value.retry_after == 2
    assert not caught.value.cool_pool
    # A server that is not there (restarting behind a proxy) waits on the breaker; a
    # saturated one (503) also cuts the adaptive limit.
    assert caught.value.unavailable == (status in (502, 503))
    assert caught.value.overloaded == (status == 503)


async def test_a_transient_failure_does_not_spoil_the_next_call(
    faulty: Embed, fault_server: FaultServer
) -> None:
    fault_server.reply_next(503)
    with pytest.raises(TransientError):
        await faulty.process(chunks("hello"))
    [item] = await faulty.process(chunks("hello"))
    assert len(item.data["vector"]) == 384


async def test_a_dropped_connection_is_transient(faulty: Embed, fault_server: FaultServer) -> None:
    fault_server.drop_next()
    with pytest.raises(TransientError) as caught:
        await faulty.process(chunks("hello"))
    assert caught.value.reason == "connection"


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stage = make_stage(f"http://127.0.0.1:{port}/v1")
    await stage.open()
    try:
        with pytest.raises(TransientError) as caught:
            await stage.process(chunks("hello"))
    finally:
        await stage.close()
    assert caught.value.reason == "connection"
    assert caught.value.unavailable and not caught.value.overloaded


@pytest.mark.parametrize("kind", ["not_json", "wrong_shape", "short"])
async def test_a_garbage_body_is_a_bad_response(
    faulty: Embed, fault_server: FaultServer, kind: Any
) -> None:
    fault_server.garbage_next(kind=kind)
    with pytest.raises(TransientError) as caught:
        await faulty.process(chunks("hello", "world"))
    assert caught.value.reason == "bad_response"


async def test_embeddings_are_placed_by_their_index(
    faulty: Embed, fault_server: FaultServer
) -> None:
    reply = embedding_reply(EmbeddingRequest(["first", "second"], "m", "base64"))
    reply["data"].reverse()
    fault_server.reply_next(200, body=json.dumps(reply))
    out = await faulty.process(chunks("first", "second"))
    expected = embed_texts(["first", "second"])
    assert np.array_equal(np.asarray([i.data["vector"] for i in out], dtype=np.float32), expected)


async def test_vectors_of_another_size_than_dimensions_are_fatal(fault_server: FaultServer) -> None:
    """A server that ignores `dimensions` would fail every document the same way."""
    fault_server.reply_next(200, body=json.dumps(embedding_reply(EmbeddingRequest(["x"], "m"))))
    stage = make_stage(fault_server.url, dimensions=32)
    await stage.open()
    try:
        with pytest.raises(FatalError, match="384-dimension"):
            await stage.process(chunks("x"))
    finally:
        await stage.close()


async def test_a_hung_request_times_out_then_release_lets_requests_through(
    fault_server: FaultServer,
) -> None:
    stage = make_stage(fault_server.url, request_timeout_s=0.3)
    await stage.open()
    try:
        fault_server.hang()
        with pytest.raises(TransientError) as caught:
            await stage.process(chunks("hello"))
        assert caught.value.reason == "timeout"
        assert caught.value.overloaded and not caught.value.unavailable
        assert fault_server.requests == 1
        fault_server.release()
        [item] = await stage.process(chunks("hello"))
        assert len(item.data["vector"]) == 384
    finally:
        await stage.close()


async def test_release_answers_a_held_request(faulty: Embed, fault_server: FaultServer) -> None:
    fault_server.hang()
    call = asyncio.create_task(faulty.process(chunks("hello")))
    assert await asyncio.to_thread(fault_server.wait_for_requests, 1, timeout=10)
    assert not call.done()
    fault_server.release()
    async with asyncio.timeout(10):
        [item] = await call
    assert len(item.data["vector"]) == 384


async def test_close_ends_hung_requests(fault_server: FaultServer) -> None:
    stage = make_stage(fault_server.url, request_timeout_s=30)
    await stage.open()
    try:
        fault_server.hang()
        call = asyncio.create_task(stage.process(chunks("hello")))
        assert await asyncio.to_thread(fault_server.wait_for_requests, 1, timeout=10)
        async with asyncio.timeout(10):
            await asyncio.to_thread(fault_server.close)
            with pytest.raises(StageError):
                await call
    finally:
        await stage.close()


async def test_a_rejected_input_is_permanent_with_the_server_message(
    faulty: Embed, fault_server: FaultServer
) -> None:
    fault_server.reject_input("poison")
    items = chunks("fine", "some poison here", "also fine")
    with pytest.raises(PermanentError) as caught:
        await faulty.process(items)
    assert caught.value.reason == "http_400"
    assert "poison" in str(caught.value)
    assert [i.data["text"] for i in await faulty.process(items[:1])] == ["fine"]


async def test_a_fastapi_422_that_echoes_the_input_keeps_the_reason_not_the_text(
    faulty: Embed, fault_server: FaultServer
) -> None:
    text = "Confidential: the merger with Northwind closes on the first of March."
    body = {
        "detail": [
            {
                "type": "string_too_long",
                "loc": ["body", "input", 0],
                "msg": "String should have at most 64 characters",
                "input": text,
            }
        ]
    }
    fault_server.reply_next(422, body=json.dumps(body))
    with pytest.raises(PermanentError) as caught:
        await faulty.process(chunks(text))
    message = str(caught.value)
    assert "String should have at most 64 characters" in message and "body.input.0" in message
    assert "Northwind" not in message and "merger" not in message
    assert caught.value.reason == "http_422" and caught.value.config_suspect


async def test_the_window_the_server_reports_counts_the_chunks_the_model_cuts() -> None:
    with CapacityServer(per_text_s=0.0, max_input_tokens=16) as server:
        stage = make_stage(server.url)
        await stage.open()
        try:
            await stage.process(chunks("short one", "a much longer text " * 10))
        finally:
            await stage.close()
    [note] = stage.notes()
    assert note.startswith("1 of 2 chunks (50%) were longer than hash-384's input window of 16")
    assert "reported by the server" in note


async def test_the_first_chunks_over_the_window_are_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long = "a much longer text " * 10
    with CapacityServer(per_text_s=0.0, max_input_tokens=16) as server:
        stage = make_stage(server.url)
        await stage.open()
        try:
            with caplog.at_level(logging.WARNING, logger="stages.embed"):
                await stage.process(chunks(long, long, "short"))  # two at once, then more
                await stage.process(chunks(long))
        finally:
            await stage.close()
    warned = [r for r in caplog.records if "input window" in r.getMessage()]
    assert len(warned) == 1 and "16-token input window" in warned[0].getMessage()


async def test_an_item_without_text_is_permanent(faulty: Embed) -> None:
    with pytest.raises(PermanentError):
        await faulty.process([Item("a.pdf", {"path": "a.pdf"})])


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_credentials_are_fatal_and_name_the_variable_not_the_key(
    fault_server: FaultServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    fault_server.reply_next(status, body=f'{{"error": {{"message": "bad key {SECRET}"}}}}')
    stage = make_stage(fault_server.url, api_key_env=KEY_ENV)
    caplog.set_level(logging.DEBUG)
    await stage.open()
    try:
        with pytest.raises(FatalError) as caught:
            await stage.process(chunks("hello"))
    finally:
        await stage.close()
    assert f"${KEY_ENV}" in str(caught.value)
    assert f"HTTP {status}" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in caplog.text


async def test_the_key_never_appears_in_errors_logs_or_repr(
    fault_server: FaultServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failure path, including a server that echoes the key back in a 400."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    stage = make_stage(fault_server.url, api_key_env=KEY_ENV, request_timeout_s=0.3)
    await stage.open()
    errors: list[BaseException] = []
    try:
        fault_server.reply_next(400, body=f'{{"error": {{"message": "key {SECRET} is odd"}}}}')
        fault_server.reply_next(429)
        fault_server.reply_next(503)
        fault_server.reply_next(401)
        fault_server.drop_next()
        fault_server.garbage_next()
        for _ in range(6):
            with pytest.raises(PipelineError) as caught:
                await stage.process(chunks("hello"))
            errors.append(caught.value)
        fault_server.hang()
        with pytest.raises(TransientError) as timed_out:
            await stage.process(chunks("hello"))
        errors.append(timed_out.value)
        fault_server.release()
        shown = [repr(stage), caplog.text]
    finally:
        await stage.close()
    for error in errors:
        chain: BaseException | None = error
        while chain is not None:
            shown += [str(chain), repr(chain)]
            chain = chain.__cause__ or chain.__context__
    assert "[redacted]" in str(errors[0])
    assert not [text for text in shown if SECRET in text]


@pytest.mark.parametrize("status", [404, 405])
async def test_no_embeddings_api_at_the_url_is_fatal(
    faulty: Embed, fault_server: FaultServer, status: int
) -> None:
    fault_server.reply_next(status, body='{"error": {"message": "no such route"}}')
    with pytest.raises(FatalError, match="check url and model"):
        await faulty.process(chunks("hello"))


async def test_requests_are_counted_by_status_for_the_metrics(
    faulty: Embed, fault_server: FaultServer
) -> None:
    fault_server.reply_next(503)
    with pytest.raises(TransientError):
        await faulty.process(chunks("hello"))
    await faulty.process(chunks("hello"))
    assert faulty.counts == {("embedding_requests", "503"): 1, ("embedding_requests", "200"): 1}
