"""Qdrant Edge in a process of its own: the store's work leaves the engine's process.

Edge is embedded: building its points from Python lists and writing segments
takes ~80 ms of CPU per 1,000 chunks, which in the engine's process would count
against the one process every chunk passes through (bench/RESULTS.md section 8).
So `qdrant.upsert` with `engine: edge` runs the shard in a child process and talks
to it over a pipe: one round trip per call (a batch of points goes as one
float32 array, its ids and its payloads). The child is still embedded, no server:
it is started by the store, holds the shard's WAL lock, and ends with it.

    close()           the child flushes, closes the shard and exits
    the engine dies   the child reads end-of-file and exits at once, as a kill
                      would: the WAL already holds every acknowledged point
    the child dies    every later call is a FatalError: the run stops and its
                      pending documents resume on the next run

Ctrl-C and a SIGTERM sent to the whole process group are ignored by the child:
the engine decides when to stop, and drains into the store first.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.errors import FatalError, exit_reason
from pipeline.process_name import set_process_name

__all__ = ["EdgeProcess"]


class EdgeProcess:
    """`stages.qdrant_edge.EdgeEngine`'s calls, answered by a child process that holds it.

    Not thread-safe, like the engine it stands for: `stages.qdrant.Upsert` serialises
    calls with its lock.
    """

    def __init__(self, folder: Path, *, distance: str, flush_s: float) -> None:
        self.folder = folder
        mine, theirs = multiprocessing.Pipe()
        # A new interpreter running this module, not a multiprocessing child: that
        # would import the caller's __main__ again (a script, a notebook, stdin).
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), str(folder), distance,
             str(flush_s)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self._conn: Connection | None = mine
        try:
            self._answer()  # the shard loaded (or not yet created), or why not
        except BaseException:
            self._end()
            raise

    def upsert(self, ids: Sequence[str], vectors: Sequence[Any], payloads: Sequence[Any]) -> None:
        import numpy as np  # here: the engine's process need not load numpy before this

        self._call("upsert", list(ids), np.asarray(vectors, dtype=np.float32), list(payloads))

    def delete_paths(self, paths: Sequence[str]) -> None:
        self._call("delete_paths", list(paths))

    def search(self, vector: Sequence[float], limit: int) -> list[tuple[float, dict[str, Any]]]:
        result: list[tuple[float, dict[str, Any]]] = self._call("search", list(vector), limit)
        return result

    def count(self) -> int:
        return int(self._call("count"))

    def points(self) -> dict[str, tuple[list[float], dict[str, Any]]]:
        result: dict[str, tuple[list[float], dict[str, Any]]] = self._call("points")
        return result

    def recorded_model(self) -> str | None:
        model: str | None = self._call("recorded_model")
        return model

    def record_model(self, model: str, dimension: int) -> None:
        self._call("record_model", model, dimension)

    def optimize(self) -> None:
        self._call("optimize")

    def close(self) -> None:
        """Flush and close the shard, and let the child exit; safe to call twice."""
        if self._conn is None:
            return
        try:
            self._call("close")
        finally:
            self._end()

    def _call(self, method: str, *args: Any) -> Any:
        if self._conn is None:
            raise FatalError(f"the Qdrant Edge store at {self.folder} is closed")
        try:
            self._conn.send((method, args))
        except OSError:
            raise self._died() from None
        return self._answer()

    def _answer(self) -> Any:
        assert self._conn is not None
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if status == "error":
            raise value
        return value

    def _died(self) -> FatalError:
        try:
            code: int | None = self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._end()
        return FatalError(f"the Qdrant Edge process for {self.folder} died ({exit_reason(code)})")

    def _end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        try:
            self._child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


def _serve(conn: Connection, folder: Path, distance: str, flush_s: float) -> None:
    """The child: open the shard, then answer calls until close() or end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name("qdrant edge")
    from stages.qdrant_edge import EdgeEngine

    try:
        engine = EdgeEngine(folder, distance=distance, flush_s=flush_s)
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", exc))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the engine is gone: exit now, without a flush, as a kill would
        try:
            answer = ("ok", getattr(engine, method)(*args))
        except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
            answer = ("error", exc)
        try:
            conn.send(answer)
        except OSError:
            os._exit(0)  # the parent died while this call ran
        if method == "close":
            return


if __name__ == "__main__":  # the child: python -m stages.edge_process FD FOLDER DISTANCE FLUSH_S
    _fd, _folder, _distance, _flush_s = sys.argv[1:5]
    _serve(Connection(int(_fd)), Path(_folder), _distance, float(_flush_s))
