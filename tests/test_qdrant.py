"""The store stage against real engines: Qdrant Edge and qdrant-client's local mode.

Local mode stands in for a server (they share one API), so everything runs in
tmp_path with no network; the unreachable-server test dials a closed local port.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import FatalError, PermanentError, TransientError
from pipeline.stage import Hit, Item, Searcher
from stages.qdrant import Upsert, point_id
from tests.processes import command, name, parents

ENGINES = ["edge", "qdrant-client"]
DIM = 16


def vector_for(doc: str, n: int) -> list[float]:
    """A fixed pseudo-random unit vector per chunk, so nearest neighbours are known."""
    rng = np.random.default_rng(zlib.crc32(f"{doc}#{n}".encode()))
    v = rng.standard_normal(DIM)
    return [float(x) for x in v / np.linalg.norm(v)]


def chunk(doc: str, n: int, *, page: int = 1) -> Item:
    return Item(
        doc=doc,
        data={
            "path": doc,
            "file": f"/abs/{doc}",
            "sha256": "ab" * 32,
            "page": page,
            "chunk": n,
            "text": f"{doc} chunk {n}",
            "vector": vector_for(doc, n),
        },
    )


def chunks(doc: str, count: int) -> list[Item]:
    return [chunk(doc, n, page=1 + n // 2) for n in range(count)]


def make(tmp_path: Path, engine: str, **params: Any) -> Upsert:
    return Upsert({"path": tmp_path / "store", "engine": engine, **params}, name="store")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path, engine: str) -> Iterator[Upsert]:
    s = make(tmp_path, engine)
    s.open()
    yield s
    s.close()


def test_search_finds_the_nearest_chunk_with_its_fields(store: Upsert) -> None:
    store.process(chunks("a.pdf", 5) + chunks("b.pdf", 5))

    hits = store.search(vector_for("b.pdf", 3), limit=3)

    assert isinstance(store, Searcher)
    assert len(hits) == 3
    assert hits[0] == Hit(score=hits[0].score, path="b.pdf", page=2, chunk=3, text="b.pdf chunk 3")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_process_returns_items_without_vectors_and_stores_no_file(store: Upsert) -> None:
    items = chunks("a.pdf", 2)

    out = store.process(items)

    assert [i.data["chunk"] for i in out] == [0, 1]
    assert all("vector" not in i.data and i.data["text"] for i in out)
    (vector, payload) = store.points()[point_id("a.pdf", 1)]
    assert vector == pytest.approx(vector_for("a.pdf", 1), abs=1e-6)
    assert payload == {
        "path": "a.pdf",
        "sha256": "ab" * 32,
        "page": 1,
        "chunk": 1,
        "text": "a.pdf chunk 1",
    }


def test_numpy_vectors_are_stored(store: Upsert) -> None:
    item = chunk("a.pdf", 0)
    item.data["vector"] = np.asarray(item.data["vector"], dtype=np.float32)

    store.process([item])

    assert store.search(vector_for("a.pdf", 0), limit=1)[0].path == "a.pdf"


def test_upserting_the_same_items_again_keeps_the_count(store: Upsert) -> None:
    store.process(chunks("a.pdf", 4))
    store.process(chunks("a.pdf", 4))

    assert store.count() == 4


def test_discard_removes_only_the_named_documents_points(store: Upsert) -> None:
    store.process(chunks("a.pdf", 3) + chunks("b.pdf", 4) + chunks("c.pdf", 2))

    store.discard(["a.pdf", "c.pdf"])

    assert store.count() == 4
    assert {p["path"] for _, p in store.points().values()} == {"b.pdf"}


def test_an_empty_store_searches_counts_and_discards_nothing(store: Upsert) -> None:
    store.discard(["a.pdf"])

    assert store.search(vector_for("a.pdf", 0), limit=5) == []
    assert store.count() == 0
    assert store.points() == {}


def test_points_survive_close_and_reopen(tmp_path: Path, engine: str) -> None:
    first = make(tmp_path, engine)
    first.open()
    first.process(chunks("a.pdf", 3))
    before = first.points()
    first.close()
    first.close()  # idempotent

    again = make(tmp_path, engine)
    again.open()
    try:
        after = again.points()
        assert after.keys() == before.keys()
        for key, (vector, payload) in before.items():
            assert after[key][1] == payload
            assert after[key][0] == pytest.approx(vector, abs=1e-6)  # stored as float32
        again.discard(["a.pdf"])  # the reloaded store knows its points' paths
        assert again.count() == 0
    finally:
        again.close()


def test_threads_sharing_one_copy_store_every_batch(store: Upsert) -> None:
    batches = [chunks(f"doc{n}.pdf", 8) for n in range(12)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(store.process, batches))

    assert store.count() == 12 * 8


def test_point_id_is_a_deterministic_uuid_per_document_and_chunk() -> None:
    assert point_id("a.pdf", 1) == point_id("a.pdf", 1)
    assert uuid.UUID(point_id("a.pdf", 1)).version == 5
    namespace = uuid.UUID("6f1d3c52-64a4-4c43-9d55-8f3b1c2e7a90")
    for doc, chunk in [("a.pdf", 0), ("a.pdf", 1), ("dir/ü#2.pdf", 12345)]:
        assert point_id(doc, chunk) == str(uuid.uuid5(namespace, f"{doc}#{chunk}"))
    assert len({point_id("a.pdf", 1), point_id("a.pdf", 2), point_id("b.pdf", 1)}) == 3


def test_edge_indexes_payload_path(tmp_path: Path) -> None:
    import qdrant_edge

    store = make(tmp_path, "edge")
    store.open()
    store.process(chunks("a.pdf", 2))
    store.close()

    shard = qdrant_edge.EdgeShard.load(str(tmp_path / "store" / "documents"))
    try:
        assert "path" in shard.info().payload_schema
    finally:
        shard.close()


def test_edge_optimize_keeps_every_point(tmp_path: Path) -> None:
    store = make(tmp_path, "edge", flush_s=0)
    store.open()
    for n in range(5):
        store.process(chunks(f"doc{n}.pdf", 10))
    store.optimize()
    assert store.count() == 50
    assert store.search(vector_for("doc3.pdf", 7), limit=1)[0].chunk == 7
    store.close()


def test_edge_store_opened_twice_raises_fatal_in_use(tmp_path: Path) -> None:
    first = make(tmp_path, "edge")
    first.open()
    first.process(chunks("a.pdf", 1))
    second = make(tmp_path, "edge")
    try:
        with pytest.raises(FatalError, match="in use by another run"):
            second.open()
    finally:
        first.close()
    second.open()  # the lock goes with close()
    assert second.count() == 1
    second.close()


def test_edge_store_held_by_another_process_raises_fatal_in_use(tmp_path: Path) -> None:
    holder = make(tmp_path, "edge")
    holder.open()
    holder.process(chunks("a.pdf", 1))
    script = textwrap.dedent(
        f"""
        from pipeline.errors import FatalError, PermanentError, TransientError
        from stages.qdrant import Upsert
        try:
            Upsert({{"path": {str(tmp_path / "store")!r}}}, name="store").open()
        except FatalError as exc:
            print(exc)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    finally:
        holder.close()
    assert done.stdout.strip() == f"store in use by another run: {tmp_path / 'store' / 'documents'}"


def test_edge_rejects_vectors_of_another_size(tmp_path: Path) -> None:
    store = make(tmp_path, "edge")
    store.open()
    store.process(chunks("a.pdf", 1))
    wrong = chunk("b.pdf", 0)
    wrong.data["vector"] = [0.5] * (DIM + 1)
    with pytest.raises(FatalError, match="dim"):
        store.process([wrong])
    store.close()


def test_local_mode_folder_in_use_raises_fatal(tmp_path: Path) -> None:
    first = make(tmp_path, "qdrant-client")
    first.open()
    try:
        with pytest.raises(FatalError, match="in use by another run"):
            make(tmp_path, "qdrant-client").open()
    finally:
        first.close()


def test_local_mode_logs_one_warning_about_its_limits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make(tmp_path, "qdrant-client")
    with caplog.at_level(logging.WARNING, logger="stages.qdrant"):
        store.open()
        store.process(chunks("a.pdf", 3))
        store.close()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "SQLite" in caplog.records[0].getMessage()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_unreachable_server_raises_fatal_without_the_api_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TEST_QDRANT_KEY", "s3cret-key-value")
    url = f"http://127.0.0.1:{port}"
    params = {"url": url, "engine": "qdrant-client", "api_key_env": "TEST_QDRANT_KEY", "timeout": 1}
    store = Upsert(params, name="store")

    started = time.monotonic()
    with pytest.raises(FatalError, match=f"Qdrant server unreachable at {url}") as caught:
        store.open()

    assert time.monotonic() - started < 5
    assert "s3cret-key-value" not in str(caught.value)
    assert "s3cret-key-value" not in caplog.text


class StubServer(ThreadingHTTPServer):
    """A stand-in Qdrant server on 127.0.0.1: "no such collection", then `status` for the rest."""

    status = 503
    exists_status = 200
    api_keys: list[str | None]


class StubHandler(BaseHTTPRequestHandler):
    server: StubServer

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.api_keys.append(self.headers.get("api-key"))
        if self.path.endswith("/exists") and self.server.exists_status == 200:
            code, body = 200, {"result": {"exists": False}, "status": "ok", "time": 0.0}
        else:
            code = self.server.status if not self.path.endswith("/exists") else 403
            body = {"status": {"error": f"injected {code}"}, "time": 0.0}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "7")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = answer

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer(("127.0.0.1", 0), StubHandler)
    server.api_keys = []
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def server_store(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> Upsert:
    monkeypatch.setenv("TEST_QDRANT_KEY", "s3cret-key-value")
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    params = {"url": url, "engine": "qdrant-client", "api_key_env": "TEST_QDRANT_KEY"}
    return Upsert(params, name="store")


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_rejecting_the_api_key_is_fatal_at_open(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.exists_status = 403
    store = server_store(stub, monkeypatch)

    with pytest.raises(FatalError, match="rejected the API key: 403") as caught:
        store.open()

    assert stub.api_keys == ["s3cret-key-value"]  # sent, and only to the server
    assert "s3cret-key-value" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (503, TransientError, "http_503"),
        (429, TransientError, "http_429"),
        (400, PermanentError, "http_400"),
    ],
)
def test_server_errors_mid_run_map_to_the_error_tree(
    stub: StubServer,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    error: type[Exception],
    reason: str,
) -> None:
    stub.status = status
    store = server_store(stub, monkeypatch)
    store.open()
    try:
        assert store.search(vector_for("a.pdf", 0), limit=3) == []  # no collection yet
        with pytest.raises(error) as caught:
            store.process(chunks("a.pdf", 2))
    finally:
        store.close()
    assert type(caught.value) is error
    assert getattr(caught.value, "reason", None) == reason
    if status != 400:
        assert getattr(caught.value, "retry_after", None) == 7
        assert getattr(caught.value, "cool_pool", None) is (status == 429)


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"path": "store", "url": "http://127.0.0.1:6333", "engine": "qdrant-client"}, "url"),
        ({"engine": "edge"}, "path"),
        ({"engine": "qdrant-client"}, "path"),
        ({"url": "http://127.0.0.1:6333", "engine": "edge"}, "engine"),
    ],
)
def test_check_rejects_anything_but_one_place_to_store(params: dict[str, Any], key: str) -> None:
    assert [p.key for p in Upsert.check(params)] == [key]


@pytest.mark.parametrize(
    "params",
    [
        {"path": "store", "engine": "edge"},
        {"path": "store", "engine": "qdrant-client"},
        {"url": "http://127.0.0.1:6333", "engine": "qdrant-client"},
    ],
)
def test_check_accepts_a_folder_or_a_server(params: dict[str, Any]) -> None:
    assert Upsert.check(params) == []


def test_batch_size_is_the_batch_param(tmp_path: Path) -> None:
    assert make(tmp_path, "edge").batch_size == 256
    assert make(tmp_path, "edge", batch=32).batch_size == 32


def test_edge_keeps_acknowledged_points_when_the_process_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from tests.test_qdrant import chunks
        from stages.qdrant import Upsert
        store = Upsert({{"path": {str(tmp_path / "store")!r}, "flush_s": 1000}}, name="s")
        store.open()
        store.process(chunks("a.pdf", 30))
        os._exit(0)  # no close(), no flush: only the WAL has the points
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)

    store = make(tmp_path, "edge")
    store.open()
    assert store.count() == 30
    store.close()


def with_model(items: list[Item], model: str) -> list[Item]:
    for item in items:
        item.data["model"] = model
    return items


def test_the_store_records_its_model_and_refuses_another_before_writing(
    store: Upsert, tmp_path: Path, engine: str
) -> None:
    store.process(with_model(chunks("a.pdf", 2), "all-MiniLM-L6-v2"))
    with pytest.raises(FatalError, match="built with model 'all-MiniLM-L6-v2'"):
        store.process(with_model(chunks("b.pdf", 2), "hash-384"))

    assert {p["path"] for _, p in store.points().values()} == {"a.pdf"}  # nothing written
    assert all("model" not in p for _, p in store.points().values())  # not per point
    store.close()
    reopened = make(tmp_path, engine)
    reopened.open()
    try:
        assert reopened.recorded_model() == "all-MiniLM-L6-v2"  # kept with the collection
    finally:
        reopened.close()


def test_a_collection_with_points_but_no_record_is_adopted_with_a_warning(
    store: Upsert, caplog: pytest.LogCaptureFixture
) -> None:
    store.process(chunks("old.pdf", 2))  # written before models were recorded
    assert store.recorded_model() is None
    with caplog.at_level(logging.WARNING):
        store.process(with_model(chunks("new.pdf", 1), "m"))
    assert "no record of the model" in caplog.text
    assert store.recorded_model() == "m"


def _edge_children() -> list[int]:
    """This process's children that run `stages.edge_process`."""
    return [
        pid
        for pid, parent in parents().items()
        if parent == os.getpid() and b"stages.edge_process" in command(pid)
    ]


def test_an_edge_store_whose_process_died_stops_with_a_fatal_error(tmp_path: Path) -> None:
    store = make(tmp_path, "edge")
    store.open()
    try:
        store.process(chunks("a.pdf", 2))
        (child,) = _edge_children()
        os.kill(child, signal.SIGKILL)
        with pytest.raises(FatalError, match="died"):
            store.process(chunks("b.pdf", 2))
    finally:
        store.close()
    assert not _edge_children()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_edge_process_is_named_for_top_and_ps(tmp_path: Path) -> None:
    store = make(tmp_path, "edge")
    store.open()
    try:
        (child,) = _edge_children()
        assert name(child) == "qdrant edge"
    finally:
        store.close()


def test_an_edge_store_opens_from_a_script_without_a_main_guard(tmp_path: Path) -> None:
    script = f"""
from stages.qdrant import Upsert
from tests.test_qdrant import chunks
store = Upsert({{"path": {str(tmp_path)!r}, "collection": "docs"}}, name="store")
store.open()
store.process(chunks("a.pdf", 3))
print(store.count())
store.close()
"""
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"


def test_an_edge_process_whose_parent_left_mid_call_exits_quietly(tmp_path: Path) -> None:
    """The parent (the embedder's process, killed) is gone before the answer: the Edge
    process finishes the call, finds nobody to answer, and exits at once, with no
    traceback on the run's terminal and no flush (the WAL has the points)."""
    import multiprocessing

    mine, theirs = multiprocessing.Pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "stages.edge_process", str(theirs.fileno()),
         str(tmp_path / "docs"), "cosine", "60"],
        pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    theirs.close()
    assert mine.recv() == ("ok", None)  # opened
    os.kill(child.pid, signal.SIGSTOP)  # so the call is read only once the parent is gone
    mine.send(("count", ()))  # a call whose answer nobody will read
    mine.close()
    os.kill(child.pid, signal.SIGCONT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "Traceback" not in err, err
