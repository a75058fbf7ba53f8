"""The contract between the engine and a stage.

A stage sees items, never channels or pools: `process(items) -> items`. The engine
decides where it runs (a worker process, a thread, a coroutine), how many copies
run, how items are batched, retried and accounted to their documents.

Items carry their document's key (the path relative to the source) and a plain
dict of fields. Stages talk to each other only through those fields, so a new
stage (say, one that adds a `title`) slots in with a YAML edit. The fields the
shipped stages use:

    source  -> {"path", "file" (absolute), "sha256"}
    extract -> {"path", "sha256", "pages": [(page_number, text), ...], "ocr_pages"?: [n]}
    chunk   -> {"path", "sha256", "page", "chunk", "text", "ocr"?: True}  one per chunk
    embed   -> the chunk's fields plus "vector": a float32 numpy row
    store   -> the items it stored, once the store acknowledged them

Lifecycle: `open()` once per copy before any item (in the worker process for
process pools), `close()` once at the end. A stage holding state about documents
(a store) implements `discard(docs)` so the engine can remove a document's old
output before re-indexing it or after it fails half-written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

__all__ = [
    "REQUIRED",
    "AsyncStage",
    "Hit",
    "Item",
    "Param",
    "ParamProblem",
    "PoolKind",
    "QueryEmbedder",
    "Searcher",
    "Stage",
    "StageBase",
]

PoolKind = Literal["process", "thread", "async"]
ParamType = Literal["int", "float", "str", "bool", "url", "env", "path", "model"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(slots=True)
class Item:
    """One unit of work: a document, a page set or a chunk, tagged with its document."""

    doc: str
    data: dict[str, Any] = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[Item], tuple[str, dict[str, Any]]]:
        # Items cross processes by the thousand (worker results, a stage's own
        # process): rebuilt from their two fields, unpickling is ~3x faster than
        # the generic path a slots class takes.
        return (Item, (self.doc, self.data))


@dataclass(frozen=True, slots=True)
class Param:
    """One `with:` parameter: what the config loader checks and the JSON Schema shows.

    `env` is the name of an environment variable (checked to be set, its value
    never read by the loader); `path` resolves against the config file's folder;
    `model` is a model's name, or a folder that resolves like a path when it exists.
    """

    type: ParamType
    default: Any = REQUIRED
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True, slots=True)
class ParamProblem:
    """A cross-parameter mistake found by `StageBase.check`, e.g. overlap >= size."""

    key: str
    expected: str
    got: object


class StageBase:
    """What every stage declares to the engine and the config loader."""

    PARAMS: ClassVar[Mapping[str, Param]] = {}
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("thread",)  # the first is the default
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = 1
    # Counters the stage keeps about its own work, exported as Prometheus metrics
    # `pipeline_<name>_total{stage, <label>}`: name -> (label, help). A worker
    # process sends its counts back with each call's results.
    COUNTERS: ClassVar[Mapping[str, tuple[str, str]]] = {}
    # Runs as well in another process, on the outputs of the stage before it: right
    # after a process-pool stage, or an async stage in its own process, it runs in
    # that stage's process (see pipeline.fusion). Shares nothing with the engine's.
    FUSIBLE: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        self.params = dict(params)  # validated by the config loader, defaults filled in
        self.name = name
        # Copies of `process` that run at once in this stage's pool: threads and
        # coroutines share one copy, each worker process has its own.
        self.concurrency = concurrency
        self.counts: Counter[tuple[str, str]] = Counter()  # (counter, label value) -> n

    def increment(self, counter: str, label: str) -> None:
        """Add one to a counter declared in COUNTERS, e.g. ("embedding_requests", "429")."""
        self.counts[(counter, label)] += 1

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """Checks that span parameters; single-parameter types come from PARAMS."""
        del params
        return []

    @property
    def batch_size(self) -> int:
        """How many items `process` takes at once; items may come from many documents."""
        return 1

    def notes(self) -> list[str]:
        """What the run should tell its user once, at the end (e.g. how many chunks were
        longer than the model's window). Asked of the engine's own copy, whose `counts`
        include those of worker processes."""
        return []

    def placement(self) -> str:
        """Where the work runs beyond the pool (a device, threads), for `pipeline validate`."""
        return ""

    def wants_gpu(self) -> bool:
        """Whether a copy would use a GPU if its machine had one (a local model): on a
        Ray cluster with GPUs, each copy then gets one."""
        return False


class Stage(StageBase, ABC):
    """A blocking stage: runs in a worker process or a thread.

    On a process pool every worker builds its own copy, so `__init__` must be
    cheap and `open` is where connections or models are made. On a thread pool
    one copy is shared by all threads.
    """

    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")

    def open(self) -> None:
        """Prepare for work; called once per copy before the first item."""

    @abstractmethod
    def process(self, items: list[Item]) -> list[Item]:
        """Turn input items into output items; raise a StageError to fail them."""

    def discard(self, docs: Sequence[str]) -> None:
        """Remove what this stage keeps about `docs`; only stores need this."""
        del docs

    def close(self) -> None:
        """Release resources; called once after the last item, even after failure."""


class AsyncStage(StageBase, ABC):
    """An I/O stage: many concurrent `process` calls share one event loop and one copy."""

    POOLS: ClassVar[tuple[PoolKind, ...]] = ("async",)

    async def open(self) -> None:
        """Prepare for work (open clients); called once before the first item."""

    @abstractmethod
    async def process(self, items: list[Item]) -> list[Item]:
        """Turn input items into output items; raise a StageError to fail them."""

    async def discard(self, docs: Sequence[str]) -> None:
        """Remove what this stage keeps about `docs`; only stores need this."""
        del docs

    async def close(self) -> None:
        """Release resources; called once after the last item, even after failure."""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result, as `pipeline search` prints it."""

    score: float
    path: str
    page: int
    chunk: int
    text: str


@runtime_checkable
class QueryEmbedder(Protocol):
    """A stage that can embed a query the same way it embeds chunks: a coroutine on
    an AsyncStage (an API), a blocking call on a Stage (a model in this process)."""

    def embed_texts(self, texts: list[str]) -> Any: ...


@runtime_checkable
class Searcher(Protocol):
    """A stage that can answer a nearest-neighbour query over what it stored."""

    def search(self, vector: list[float], *, limit: int) -> list[Hit]: ...
