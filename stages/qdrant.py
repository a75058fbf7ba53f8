"""`qdrant.upsert`: store embedded chunks in Qdrant, and search them.

Two engines behind one stage, chosen by `engine:`:

    edge           Qdrant Edge, embedded (no server), one shard per folder
                   (`path`/`collection`), run in a child process of the store's
                   own; see `stages.qdrant_edge` and `stages.edge_process`
    qdrant-client  a Qdrant server at `url`, or the client's local mode in `path`,
                   which shares the server's API but keeps every point in SQLite
                   and every vector in RAM: fine for tests and small corpora only

Point ids are uuid5 of (document, chunk index), so re-indexing a document
overwrites its points instead of duplicating them; `discard` removes a document's
points by the indexed payload `path`. Engine libraries are imported by `open()`,
not with the module, so loading the stage registry stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pipeline.errors import (
    FatalError,
    InUseError,
    PermanentError,
    PipelineError,
    TransientError,
)
from pipeline.stage import Hit, Item, Param, ParamProblem, PoolKind, Stage
from pipeline.vector_space import same_model

__all__ = ["Upsert", "point_id"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_NAMESPACE = uuid.UUID("6f1d3c52-64a4-4c43-9d55-8f3b1c2e7a90")  # fixed: ids must survive reruns
_NAMESPACE_BYTES = _NAMESPACE.bytes
# The vector goes in the point itself, "file" is this host's path, and "model" is
# recorded once for the whole collection (pipeline.vector_space).
_NOT_STORED = ("vector", "file", "model")
_PAGE = 1024
_MODEL_KEY = "pipeline_model"  # in a server collection's metadata


def point_id(doc: str, chunk: int) -> str:
    """The point id of chunk `chunk` of document `doc`: the same on every run.

    It is `uuid.uuid5(_NAMESPACE, f"{doc}#{chunk}")`, computed directly (~3x faster
    than building a UUID object: one id per chunk, in the engine's process). The
    chunk index is digits, so the last "#" splits the name unambiguously even when
    the document key contains "#".
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{doc}#{chunk}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


class _Engine(Protocol):
    def upsert(
        self, ids: Sequence[str], vectors: Sequence[Any], payloads: Sequence[Any]
    ) -> None: ...
    def delete_paths(self, paths: Sequence[str]) -> None: ...
    def search(self, vector: Sequence[float], limit: int) -> list[tuple[float, dict[str, Any]]]: ...
    def count(self) -> int: ...
    def points(self) -> dict[str, tuple[list[float], dict[str, Any]]]: ...
    def recorded_model(self) -> str | None: ...
    def record_model(self, model: str, dimension: int) -> None: ...
    def optimize(self) -> None: ...
    def close(self) -> None: ...


class Upsert(Stage):
    """Upsert each batch of embedded chunks in one call, acknowledged before returning.

    One copy serves all the pool's threads, so every engine call runs under one
    lock: neither Edge shards nor local-mode clients are safe to share, and the
    store's own write path is serial anyway.
    """

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "path": Param("path", default=None, doc="Folder of the store (Edge or local mode)."),
        "url": Param("url", default=None, doc="A Qdrant server (needs engine qdrant-client)."),
        "api_key_env": Param("env", default=None, doc="Variable holding the server API key."),
        "collection": Param("str", default="documents", doc="Collection (Edge: sub-folder)."),
        "engine": Param(
            "str",
            default="edge",
            choices=("edge", "qdrant-client"),
            doc="edge: embedded, one process at a time; qdrant-client: a server at url, "
            "or local mode in path (small corpora only).",
        ),
        "batch": Param("int", default=256, minimum=1, doc="Points per upsert."),
        "flush_s": Param(
            "float",
            default=10.0,
            minimum=0,
            doc="Edge: flush segments at most this often (the WAL keeps points durable).",
        ),
        "distance": Param(
            "str",
            default="cosine",
            choices=("cosine", "dot", "euclid"),
            doc="Vector similarity; fixed when the store is created.",
        ),
        "timeout": Param("int", default=10, minimum=1, doc="Seconds per server request."),
    }
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("thread",)
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = 1
    # After an embedding stage in its own process, it stores from there: the vectors
    # never come back to the engine's process (pipeline.fusion).
    FUSIBLE: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        super().__init__(params, name=name, concurrency=concurrency)
        for key, param in self.PARAMS.items():
            self.params.setdefault(key, param.default)
        self._lock = threading.Lock()
        self._engine: _Engine | None = None
        self._model: str | None = None  # recorded with the collection, once known

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """One place to store: a folder or a server, and Edge has no server."""
        path, url = params.get("path"), params.get("url")
        if path is not None and url is not None:
            return [ParamProblem("url", "either path or url, not both", url)]
        if path is None and url is None:
            return [ParamProblem("path", "a folder (path) or a Qdrant server (url)", None)]
        if url is not None and params.get("engine", "edge") == "edge":
            return [ParamProblem("engine", '"qdrant-client" to reach a server at url', "edge")]
        return []

    @property
    def batch_size(self) -> int:
        return int(self.params["batch"])

    def open(self) -> None:
        """Connect, or load the store if it exists; raises FatalError if it cannot."""
        with self._lock:
            if self._engine is None:
                self._engine = self._connect()

    def process(self, items: list[Item]) -> list[Item]:
        """Upsert all `items` as one batch; returns them without their vectors."""
        if not items:
            return items
        ids, vectors, payloads, models = [], [], [], set()
        for item in items:
            if "vector" not in item.data or "chunk" not in item.data:
                raise PermanentError(f"{item.doc}: item has no vector or chunk", reason="no_vector")
            ids.append(point_id(item.doc, int(item.data["chunk"])))
            vectors.append(item.data["vector"])
            models.add(item.data.get("model"))
            payload = {k: v for k, v in item.data.items() if k not in _NOT_STORED}
            payloads.append({**payload, "path": item.doc})  # the key discard() matches
        with self._lock:
            engine = self._opened()
            unrecorded = self._check_model(engine, models - {None})
            engine.upsert(ids, vectors, payloads)
            if unrecorded is not None:  # the collection's first points: record their model
                engine.record_model(unrecorded, len(vectors[0]))
                self._model = unrecorded
        for item in items:
            del item.data["vector"]  # stored; downstream needs only the fields
        return items

    def _check_model(self, engine: _Engine, models: set[Any]) -> str | None:
        """Refuse vectors of a model other than the one that built the collection,
        before they are written (the engine checks before a run; this catches what it
        could not). Returns the model to record, for a collection without a record."""
        if len(models) > 1:
            raise FatalError(f"{self.name}: one batch holds vectors of {sorted(models)}")
        if not models:
            return None
        model = str(next(iter(models)))
        if self._model is None:
            self._model = engine.recorded_model()
        if self._model is None:
            if engine.count():
                logger.warning(
                    "%s: the collection holds points but no record of the model that "
                    "built them (made before models were recorded); recording %s: if "
                    "they came from another model, rebuild the collection",
                    self.name,
                    model,
                )
            return model
        if not same_model(self._model, model):
            raise FatalError(
                f"{self.name}: the collection was built with model {self._model!r}; "
                f"refusing vectors of {model!r} (vectors of two models do not compare)"
            )
        return None

    def recorded_model(self) -> str | None:
        """The model that built the collection (pipeline.vector_space); None if new."""
        with self._lock:
            if self._model is None:
                self._model = self._opened().recorded_model()
            return self._model

    def discard(self, docs: Sequence[str]) -> None:
        """Delete every point of `docs`; a no-op while the store does not exist."""
        with self._lock:
            self._opened().delete_paths(list(docs))

    def search(self, vector: list[float], *, limit: int) -> list[Hit]:
        """The `limit` chunks nearest to `vector`, best first; [] for an empty store."""
        with self._lock:
            found = self._opened().search(vector, limit)
        return [
            Hit(
                score=float(score),
                path=str(p.get("path", "")),
                page=int(p.get("page", 0)),
                chunk=int(p.get("chunk", 0)),
                text=str(p.get("text", "")),
            )
            for score, p in found
        ]

    def count(self) -> int:
        """Number of points stored."""
        with self._lock:
            return self._opened().count()

    def points(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        """Every point as id -> (vector, payload); O(n), meant for comparing stores."""
        with self._lock:
            return self._opened().points()

    def optimize(self) -> None:
        """Compact segments and build indexes (Edge); slow, so never run per batch."""
        with self._lock:
            self._opened().optimize()

    def close(self) -> None:
        """Flush and release the store; safe to call twice or without open()."""
        with self._lock:
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.close()

    def _opened(self) -> _Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.name}: open() was not called")
        return self._engine

    def _connect(self) -> _Engine:
        p = self.params
        path = None if p["path"] is None else Path(p["path"])
        if p["engine"] == "edge":
            from stages.edge_process import EdgeProcess

            assert path is not None, "check() requires path for engine edge"
            folder = path / p["collection"]
            return EdgeProcess(folder, distance=p["distance"], flush_s=p["flush_s"])
        env = p["api_key_env"]
        if env is not None and env not in os.environ:
            raise FatalError(f"{self.name}: environment variable {env} is not set")
        if path is not None:
            return _ClientEngine(p["collection"], distance=p["distance"], path=str(path))
        key = None if env is None else os.environ[env]
        url, timeout = p["url"], p["timeout"]
        return _ClientEngine(
            p["collection"], distance=p["distance"], url=url, api_key=key, timeout=timeout
        )


class _ClientEngine:
    """qdrant-client against a server (`url`) or in local mode (`path`)."""

    def __init__(self, collection: str, *, distance: str, **client: Any) -> None:
        """`client` is QdrantClient's arguments: `path`, or `url`, `api_key`, `timeout`."""
        from qdrant_client import QdrantClient

        self._collection, self._distance = collection, distance
        self._local = "path" in client
        self._where: str = client["path"] if self._local else client["url"]
        self._secret: str | None = client.get("api_key")
        if self._local:
            logger.warning(
                "qdrant-client local mode at %s keeps every point in SQLite and loads every "
                "vector into RAM: it slows down past ~20k chunks; use engine edge or a server",
                self._where,
            )
        try:
            # No compatibility check: it runs in a thread of its own that nobody
            # joins, and warns after the fact; collection_exists() below is the probe.
            self._client = QdrantClient(**client, check_compatibility=False)
        except Exception as exc:
            raise self._open_error(exc) from exc
        try:
            self._ready = self._client.collection_exists(collection)
            if self._ready:
                self._index_path()
        except Exception as exc:
            self._client.close()
            raise self._open_error(exc) from exc

    def upsert(self, ids: Sequence[str], vectors: Sequence[Any], payloads: Sequence[Any]) -> None:
        from qdrant_client import models

        rows = [v.tolist() if hasattr(v, "tolist") else list(v) for v in vectors]
        batch = models.Batch(ids=list(ids), vectors=rows, payloads=list(payloads))
        if not self._call(self._exists):
            self._call(lambda: self._create(len(rows[0])))
        self._call(lambda: self._client.upsert(self._collection, points=batch, wait=True))

    def delete_paths(self, paths: Sequence[str]) -> None:
        from qdrant_client import models

        match = models.FieldCondition(key="path", match=models.MatchAny(any=list(paths)))
        selector = models.FilterSelector(filter=models.Filter(must=[match]))
        if self._call(self._exists) and paths:
            self._call(lambda: self._client.delete(self._collection, selector, wait=True))

    def search(self, vector: Sequence[float], limit: int) -> list[tuple[float, dict[str, Any]]]:
        if not self._call(self._exists):
            return []
        found = self._call(
            lambda: self._client.query_points(self._collection, list(vector), limit=limit)
        )
        return [(p.score, dict(p.payload or {})) for p in found.points]

    def count(self) -> int:
        if not self._call(self._exists):
            return 0
        return self._call(lambda: self._client.count(self._collection).count)

    def points(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        return self._call(self._scroll_all)

    def recorded_model(self) -> str | None:
        if not self._call(self._exists):
            return None
        config = self._call(lambda: self._client.get_collection(self._collection)).config
        model = (config.metadata or {}).get(_MODEL_KEY)
        return str(model) if model is not None else None

    def record_model(self, model: str, dimension: int) -> None:
        record = {_MODEL_KEY: model, "pipeline_dimension": dimension}
        self._call(lambda: self._client.update_collection(self._collection, metadata=record))

    def optimize(self) -> None:
        """Servers optimise on their own; local mode has nothing to optimise."""

    def close(self) -> None:
        self._client.close()  # idempotent in qdrant-client

    def _scroll_all(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        out: dict[str, tuple[list[float], dict[str, Any]]] = {}
        offset = None
        while self._exists():
            records, offset = self._client.scroll(
                self._collection, limit=_PAGE, offset=offset, with_vectors=True
            )
            for r in records:
                out[str(r.id)] = (list(r.vector), dict(r.payload or {}))  # type: ignore[arg-type]
            if offset is None:
                break
        return out

    def _exists(self) -> bool:
        # Re-asked until true: on a server another run may create the collection.
        if not self._ready:
            self._ready = self._client.collection_exists(self._collection)
        return self._ready

    def _create(self, size: int) -> None:
        from qdrant_client import models

        distance = models.Distance[self._distance.upper()]
        params = models.VectorParams(size=size, distance=distance)
        self._client.create_collection(self._collection, vectors_config=params)
        self._ready = True
        self._index_path()

    def _index_path(self) -> None:
        # Local mode ignores payload indexes (and warns if asked); servers use it
        # to make discard's filtered delete a lookup instead of a scan.
        from qdrant_client import models

        if self._local or "path" in self._client.get_collection(self._collection).payload_schema:
            return
        schema = models.PayloadSchemaType.KEYWORD
        self._client.create_payload_index(self._collection, "path", schema, wait=True)

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            raise self._error(exc) from exc

    def _open_error(self, exc: Exception) -> FatalError:
        """Any failure to open is fatal: no document could be stored."""
        error = self._error(exc, opening=True)
        if isinstance(error, FatalError):
            return error
        return FatalError(f"cannot open the Qdrant store at {self._where}: {error}")

    def _error(self, exc: Exception, *, opening: bool = False) -> PipelineError:
        """Map a qdrant-client failure to the error tree; the API key never appears.

        No connection at all is fatal: every document would fail the same way. A
        slow answer mid-run is worth retrying; at open() it means no usable server.
        """
        import httpx
        from qdrant_client.common.client_exceptions import ResourceExhaustedResponse as Busy
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        cause = exc.source if isinstance(exc, ResponseHandlingException) else exc
        text = str(cause) or type(cause).__name__
        if self._secret:
            text = text.replace(self._secret, "***")
        if isinstance(exc, ResponseHandlingException):
            if opening or isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
                return FatalError(f"Qdrant server unreachable at {self._where}: {text}")
            return TransientError(f"Qdrant server at {self._where}: {text}", reason="timeout")
        if isinstance(exc, Busy):  # a 429 with Retry-After: the whole pool should wait
            return TransientError(
                f"Qdrant server at {self._where} answered 429",
                reason="http_429",
                retry_after=float(exc.retry_after_s),
                cool_pool=True,
            )
        if isinstance(exc, UnexpectedResponse):
            code = exc.status_code or 0
            if code in (401, 403):
                return FatalError(f"Qdrant server at {self._where} rejected the API key: {code}")
            if code == 429 or code >= 500:
                after = exc.headers.get("retry-after")
                wait = float(after) if after and after.isdigit() else None
                return TransientError(
                    f"Qdrant server at {self._where} answered {code}",
                    reason=f"http_{code}",
                    retry_after=wait,
                    cool_pool=code == 429,
                )
            return PermanentError(f"Qdrant at {self._where} refused: {text}", reason=f"http_{code}")
        if isinstance(exc, RuntimeError) and "already accessed" in text:
            return InUseError(f"store in use by another run: {self._where}")
        if isinstance(exc, ValueError):  # local mode's "Wrong input": a server would answer 400
            return PermanentError(f"Qdrant at {self._where} refused: {text}", reason="http_400")
        return FatalError(f"qdrant-client failed at {self._where}: {text}")
