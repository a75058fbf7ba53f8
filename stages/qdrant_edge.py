"""The Qdrant Edge engine behind `qdrant.upsert`: an embedded shard, no server.

Edge runs inside this process and keeps one folder per shard. Its errors are bare
`Exception`s whose only structure is the message, so they are translated here,
where they are raised, into the `FatalError`s the engine understands:

    failed to open WAL ...: Can't init WAL: Kind(WouldBlock)
        another `EdgeShard` (this process or another) holds the WAL's file lock
        -> FatalError("store in use by another run: <folder>")
    anything else (wrong vector size, corrupt files, closed shard)
        -> FatalError naming the folder and what was being done

The shard is created on the first upsert, because only then is the vector size
known; until then deletes, searches and counts see an empty store. Not thread-safe:
`stages.qdrant.Upsert` serialises calls with its lock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import qdrant_edge as qe

from pipeline.errors import FatalError, InUseError

__all__ = ["EdgeEngine"]

T = TypeVar("T")

_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot, "euclid": qe.Distance.Euclid}
_CONFIG_FILE = "edge_config.json"  # written by EdgeShard.create: its presence means "load me"
_MODEL_FILE = "pipeline_model.json"  # which model built the shard (pipeline.vector_space)
_LOCKED = "WouldBlock"  # the WAL lock is taken; Edge says so only in the message
_PAGE = 1024


class EdgeEngine:
    """One Edge shard at `folder`, loaded now if it exists, created on first upsert."""

    def __init__(self, folder: Path, *, distance: str, flush_s: float) -> None:
        self.folder = folder
        self._distance = _DISTANCES[distance]
        self._flush_s = flush_s
        self._flushed = time.monotonic()
        self._shard: qe.EdgeShard | None = None
        if (folder / _CONFIG_FILE).exists():
            self._adopt(self._call("open", lambda: qe.EdgeShard.load(str(folder))))

    def upsert(self, ids: Sequence[str], vectors: Sequence[Any], payloads: Sequence[Any]) -> None:
        """Write the points; returns once Edge applied them (WAL written, segment updated).

        Flushes segments to disk every `flush_s` seconds rather than every call: the
        WAL already makes the points durable (a flush only shortens the WAL replay
        when the store is next opened), and each flush holds the GIL for ~4 ms:
        flushing every batch cut the rate from ~21k to ~14k points/s. Vectors may be
        float32 numpy rows or lists.
        """
        shard = self._shard or self._create(len(vectors[0]))
        rows = np.asarray(vectors, dtype=np.float32).tolist()  # Edge reads lists fastest
        points = [qe.Point(i, v, p) for i, v, p in zip(ids, rows, payloads, strict=True)]
        self._call("upsert into", lambda: shard.update(qe.UpdateOperation.upsert_points(points)))
        self._updated()

    def delete_paths(self, paths: Sequence[str]) -> None:
        """Delete every point whose payload `path` is one of `paths` (indexed: cheap)."""
        shard = self._shard
        if shard is None or not paths:
            return
        match = qe.MatchAny(any=list(paths))
        only = qe.Filter(must=[qe.FieldCondition(key="path", match=match)])
        self._call(
            "delete from", lambda: shard.update(qe.UpdateOperation.delete_points_by_filter(only))
        )
        self._updated()

    def search(self, vector: Sequence[float], limit: int) -> list[tuple[float, dict[str, Any]]]:
        """The `limit` nearest points as (score, payload); none before the first upsert."""
        shard = self._shard
        if shard is None:
            return []
        query = qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(list(vector)), with_payload=True
        )
        found = self._call("search", lambda: shard.query(query))
        return [(p.score, dict(p.payload or {})) for p in found]

    def count(self) -> int:
        """Exact number of points."""
        shard = self._shard
        if shard is None:
            return 0
        return self._call("count", lambda: shard.count(qe.CountRequest(exact=True)))

    def points(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        """Every point as id -> (vector, payload), scrolling in pages; O(n), for tests."""
        return self._call("scroll", self._scroll_all)

    def recorded_model(self) -> str | None:
        """The model recorded as having built the shard, if any."""
        try:
            record = json.loads((self.folder / _MODEL_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FatalError(f"cannot read {self.folder / _MODEL_FILE}: {exc}") from exc
        model = record.get("model") if isinstance(record, dict) else None
        return str(model) if model is not None else None

    def record_model(self, model: str, dimension: int) -> None:
        """Record the model beside the shard; written whole (renamed into place) or not at all."""
        target = self.folder / _MODEL_FILE
        scratch = target.with_suffix(".tmp")
        try:
            with scratch.open("w", encoding="utf-8") as out:
                json.dump({"model": model, "dimension": dimension}, out)
                out.flush()
                os.fsync(out.fileno())
            scratch.replace(target)
        except OSError as exc:
            raise FatalError(f"cannot record the model in {target}: {exc}") from exc

    def optimize(self) -> None:
        """Merge segments and build the HNSW index; slow, so never called per batch."""
        shard = self._shard
        if shard is not None:
            self._call("optimize", shard.optimize)
            self._call("flush", shard.flush)

    def close(self) -> None:
        """Flush and release the shard (and its WAL lock); safe to call twice."""
        shard, self._shard = self._shard, None
        if shard is not None:
            try:
                self._call("flush", shard.flush)
            finally:
                self._call("close", shard.close)

    def _scroll_all(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        out: dict[str, tuple[list[float], dict[str, Any]]] = {}
        offset: qe.PointId | None = None
        while self._shard is not None:
            page = qe.ScrollRequest(offset=offset, limit=_PAGE, with_payload=True, with_vector=True)
            records, offset = self._shard.scroll(page)
            for r in records:
                # One unnamed dense vector per point, so Edge returns a flat list.
                out[str(r.id)] = (cast(list[float], r.vector), dict(r.payload or {}))
            if offset is None:
                break
        return out

    def _create(self, size: int) -> qe.EdgeShard:
        folder = str(self.folder)
        if (self.folder / _CONFIG_FILE).exists():  # another run created it after our open()
            shard = self._call("open", lambda: qe.EdgeShard.load(folder))
        else:
            config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=size, distance=self._distance))
            shard = self._call("create", lambda: qe.EdgeShard.create(folder, config))
        return self._adopt(shard)

    def _adopt(self, shard: qe.EdgeShard) -> qe.EdgeShard:
        """Index "path" if needed, then keep the shard; close it (freeing its lock) if not."""
        # A keyword index on "path" turns discard's filtered delete from a scan of
        # every payload (~280 ms at 200k points) into a lookup (~0.1 ms).
        try:
            if "path" not in self._call("inspect", lambda: shard.info().payload_schema):
                index = qe.UpdateOperation.create_field_index("path", qe.PayloadSchemaType.Keyword)
                self._call("index", lambda: shard.update(index))
        except FatalError:
            shard.close()
            raise
        self._shard = shard
        return shard

    def _updated(self) -> None:
        now = time.monotonic()
        if now - self._flushed >= self._flush_s and self._shard is not None:
            self._call("flush", self._shard.flush)
            self._flushed = now

    def _call(self, doing: str, call: Callable[[], T]) -> T:
        """Run one Edge call, turning its bare Exception into a FatalError."""
        try:
            return call()
        except Exception as exc:  # Edge raises only bare Exception; we re-raise typed
            if _LOCKED in str(exc):
                raise InUseError(f"store in use by another run: {self.folder}") from exc
            raise FatalError(
                f"Qdrant Edge could not {doing} the shard at {self.folder}: {exc}"
            ) from exc
