"""Toy stages for engine tests: no PDFs, no network, behaviour chosen by file content.

A toy document is a text file; its lines become items. Markers in the text make
a stage misbehave on purpose, so one corpus exercises every failure path:
`PERMANENT` (PermanentError), `BUG` (a plain ValueError), `CRASH` (the worker
process exits), `HANG` (the worker never returns), `BALLOON` (allocates 2 GiB),
`POISON` (a batch containing this line is rejected as a whole).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import PermanentError, TransientError
from pipeline.stage import AsyncStage, Item, Param, Stage

# Test-side handles to stage copies the runner builds (same process only).
GATES: dict[str, asyncio.Event] = {}
SINKS: dict[str, dict[str, list[str]]] = {}
FLAKY_LEFT: dict[str, int] = {}


class Lines(Stage):
    """Reads a toy document and emits one item per non-empty line."""

    POOLS = ("process", "thread")

    def process(self, items: list[Item]) -> list[Item]:
        out = []
        for item in items:
            text = Path(item.data["file"]).read_text()
            if "CRASH" in text:
                os._exit(7)
            if "BALLOON" in text:
                ballast = bytearray(2 * 1024**3)  # more than the worker's memory cap
                del ballast
            if "HANG" in text:
                time.sleep(3600)
            if "PERMANENT" in text:
                raise PermanentError("toy document refused", reason="toy_refused")
            if "BUG" in text:
                raise ValueError("a bug in a stage")
            lines = [line for line in text.splitlines() if line.strip()]
            for n, line in enumerate(lines):
                out.append(Item(item.doc, {"path": item.doc, "chunk": n, "text": line}))
        return out


class Tag(Stage):
    """Appends " [tagged]" to each item's text; fusible, so on a process pool after
    Lines it runs in Lines's workers. A line "REFUSE" is refused (PermanentError)."""

    POOLS = ("process", "thread")
    FUSIBLE = True

    def process(self, items: list[Item]) -> list[Item]:
        if any(item.data["text"] == "REFUSE" for item in items):
            raise PermanentError("tag refused", reason="toy_tag_refused")
        return [Item(i.doc, {**i.data, "text": i.data["text"] + " [tagged]"}) for i in items]


class Gate(AsyncStage):
    """Passes items through once its gate (GATES[params['gate']]) is open."""

    PARAMS: ClassVar[dict[str, Param]] = {
        "gate": Param("str", default="main"),
        "batch": Param("int", default=1, minimum=1),
    }

    @property
    def batch_size(self) -> int:
        return int(self.params["batch"])

    async def process(self, items: list[Item]) -> list[Item]:
        gate = GATES.setdefault(self.params["gate"], asyncio.Event())
        await gate.wait()
        if any(item.data.get("text") == "POISON" for item in items):
            raise PermanentError("batch rejected", reason="http_400")
        return items


class Flaky(AsyncStage):
    """Fails with TransientError FLAKY_LEFT[key] times, then passes items through."""

    PARAMS: ClassVar[dict[str, Param]] = {"key": Param("str", default="flaky")}

    async def process(self, items: list[Item]) -> list[Item]:
        key = self.params["key"]
        if FLAKY_LEFT.get(key, 0) > 0:
            FLAKY_LEFT[key] -= 1
            raise TransientError("try again", reason="http_503", retry_after=0.0)
        return items


class Sink(Stage):
    """Keeps what it receives in SINKS[params['name']]: doc -> texts."""

    POOLS = ("thread",)
    PARAMS: ClassVar[dict[str, Param]] = {"name": Param("str", default="sink")}

    def open(self) -> None:
        SINKS.setdefault(self.params["name"], {})

    def process(self, items: list[Item]) -> list[Item]:
        store = SINKS[self.params["name"]]
        for item in items:
            store.setdefault(item.doc, []).append(item.data["text"])
        return items

    def discard(self, docs: Sequence[str]) -> None:
        store = SINKS[self.params["name"]]
        for doc in docs:
            store.pop(doc, None)


class FileSink(Stage):
    """A store in a file: fusible, so after an async stage in its own process it runs
    there, where SINKS cannot be seen. Appends "stored DOC TEXT" per item and
    "discarded DOC" per discard to `log`; a line "REJECT" is refused."""

    POOLS = ("thread",)
    FUSIBLE = True
    PARAMS: ClassVar[dict[str, Param]] = {"log": Param("path")}

    def process(self, items: list[Item]) -> list[Item]:
        if any(item.data["text"] == "REJECT" for item in items):
            raise PermanentError("the store refused it", reason="refused")
        with open(self.params["log"], "a") as log:
            log.writelines(f"stored {item.doc} {item.data['text']}\n" for item in items)
        return items

    def discard(self, docs: Sequence[str]) -> None:
        with open(self.params["log"], "a") as log:
            log.writelines(f"discarded {doc}\n" for doc in docs)


def write_corpus(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def write_config(folder: Path, stages: str, **top: Any) -> Path:
    """A pipeline.yaml in `folder` over `folder/docs`, with the given stages block."""
    lines = [
        "source: {path: docs, glob: '**/*.txt'}",
        "state: state.db",
        *(f"{key}: {value}" for key, value in top.items()),
        "stages:",
        stages,
    ]
    path = folder / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
