"""Two small stages for config and engine tests, named by `module:Class` path.

`Double` is a blocking stage (process or thread pool); `Echo` is an async stage
whose PARAMS cover every Param type, so the config loader and the JSON Schema
see each type once. Both take only optional parameters, so a test config needs
no `with:` to use them. Refer to them as f"{Double.__module__}:Double", which
stays right however pytest imported this file.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pipeline.stage import AsyncStage, Item, Param, ParamProblem, PoolKind, Stage


class Double(Stage):
    """Multiplies each item's "n" by `factor`."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "factor": Param("int", default=2, minimum=1, doc="What to multiply n by."),
    }
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = "auto"

    def process(self, items: list[Item]) -> list[Item]:
        factor = self.params["factor"]
        return [Item(item.doc, {**item.data, "n": item.data["n"] * factor}) for item in items]


class Logged(Double):
    """Double, with a folder of the machine it runs on (where a Ray node cannot look)."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        **Double.PARAMS,
        "log": Param("path", default=None, doc="A folder of the machine it runs on."),
    }


class Pages(Stage):
    """Stands in for extraction: one page of fixed text per document, except that a
    document whose name contains "hang" never finishes (a hung parser)."""

    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")

    def process(self, items: list[Item]) -> list[Item]:
        if any("hang" in item.doc for item in items):
            threading.Event().wait()  # forever: only the stage's timeout ends it
        return [
            Item(item.doc, {"path": item.doc, "sha256": item.data.get("sha256"),
                            "pages": [(1, f"The text of {item.doc}.")]})
            for item in items
        ]  # fmt: skip


class Echo(AsyncStage):
    """Returns its items unchanged, tagged with `label`; one parameter of each type."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "count": Param("int", default=1, minimum=1, doc="Items per batch."),
        "ratio": Param("float", default=0.5, minimum=0, doc="Any fraction."),
        "label": Param("str", default="echo", doc="Stored in each item's 'label'."),
        "mode": Param("str", default="fast", choices=("fast", "slow")),
        "loud": Param("bool", default=False),
        "url": Param("url", default="http://127.0.0.1:8000/v1"),
        "key_env": Param("env", default=None, doc="A variable that must be set."),
        "out": Param("path", default=None, doc="Resolved against the config folder."),
    }
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("async",)
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = 4

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """A cross-parameter rule, so tests can see `check` problems reported."""
        if params.get("loud") and params.get("mode") == "slow":
            return [ParamProblem("mode", '"fast" when loud is true', params["mode"])]
        return []

    @property
    def batch_size(self) -> int:
        return int(self.params.get("count", 1))

    async def process(self, items: list[Item]) -> list[Item]:
        label = self.params.get("label", "echo")
        return [Item(item.doc, {**item.data, "label": label}) for item in items]
