"""`local.embed`: embed chunks with a sentence-transformers model in this machine's
own processes, no API and nothing sent anywhere.

It takes the place of `openai.embed` in pipeline.yaml:

    - name: embed
      uses: local.embed
      with: {model: all-MiniLM-L6-v2, batch: 64, device: auto}

It runs on a process pool: the model computes outside the engine's process, so the
engine's own work (channels, accounting, the store) never waits on it, and each
worker loads the model once, in `open()`. On a CPU one worker with all the machine's
cores as torch threads is the default: a transformer batch spreads over cores better
than two half-sized workers would, and extraction, which waits on embedding most of
the time, takes its share when it runs. On GPUs, one worker per GPU.

Texts longer than the model's window are cut as the model itself cuts them; each
worker counts them with the model's own tokenizer, the counts come back to the
engine with every call, and the run ends with one note saying how many were cut and
what chunk size fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pipeline.config import cpu_count
from pipeline.stage import Item, Param, ParamProblem, PoolKind, Stage
from stages import local_model
from stages.embed import texts_of
from stages.model_window import WindowCounter

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["LocalEmbed"]

logger = logging.getLogger(__name__)

_PASSES_PER_CALL = 4


class LocalEmbed(Stage):
    """Adds "vector" (a float32 numpy row) and "model" to each item from its "text"."""

    PARAMS: ClassVar[Mapping[str, Param]] = {
        "model": Param(
            "model",
            default="all-MiniLM-L6-v2",
            doc="a model name (Hugging Face cache, or a package that ships it) or a folder",
        ),
        "batch": Param("int", default=64, minimum=1, doc="texts per forward pass"),
        "device": Param(
            "str",
            default="auto",
            doc="auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N or mps",
        ),
        "threads": Param(
            "int",
            default=None,
            minimum=1,
            doc="torch CPU threads per worker (default: the CPUs divided among the workers)",
        ),
    }
    POOLS: ClassVar[tuple[PoolKind, ...]] = ("process", "thread")
    DEFAULT_SIZE: ClassVar[int | Literal["auto"]] = 1
    COUNTERS: ClassVar[Mapping[str, tuple[str, str]]] = {
        "local_embed_chunks": ("window", "Chunks embedded, by whether they fit the model window"),
        "local_embed_cut_size": ("unit", "Characters and tokens of the chunks the model cut"),
    }

    def __init__(self, params: Mapping[str, Any], *, name: str, concurrency: int = 1) -> None:
        super().__init__(params, name=name, concurrency=concurrency)
        for key, param in self.PARAMS.items():
            self.params.setdefault(key, param.default)
        self._model: SentenceTransformer | None = None
        self._window = 0

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> list[ParamProblem]:
        """The model must be on this machine now: a run never downloads one."""
        model = str(params.get("model") or "all-MiniLM-L6-v2")
        try:
            local_model.find_model(model)
        except local_model.ModelNotFound as exc:
            return [ParamProblem("model", str(exc), model)]
        device = str(params.get("device") or "auto")
        if device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
            return [ParamProblem("device", "auto, cpu, cuda, cuda:N or mps", device)]
        return []

    @property
    def batch_size(self) -> int:
        """Texts per call: four forward passes' worth. sentence-transformers sorts a
        call's texts by length before cutting them into passes of `batch`, so texts
        of like length share a pass and little of it is padding (bench.local_embed: 35
        against 29 chunks/s with calls of 64 on 2 cores)."""
        return _PASSES_PER_CALL * int(self.params["batch"])

    @property
    def model_name(self) -> str:
        """The model as pipeline.yaml names it; recorded with the collection."""
        return str(self.params["model"])

    def placement(self) -> str:
        """Where the model runs, for `pipeline validate` (imports torch to see GPUs)."""
        try:
            device = local_model.pick_device(str(self.params["device"]))
        except ImportError:
            return f"torch is not installed: {local_model.INSTALL_HINT}"
        source = f"{self.model_name} from {local_model.found_in(self.model_name)}"
        if device == "cpu":
            return f"{source}, on the CPU with {self._threads()} torch threads per worker"
        return f"{source}, on {device}, one GPU per worker (pool.size: the number of GPUs)"

    def wants_gpu(self) -> bool:
        device = str(self.params["device"])
        return device == "auto" or device.startswith("cuda")

    def _threads(self) -> int:
        threads = self.params["threads"]
        return int(threads) if threads else max(1, cpu_count() // max(1, self.concurrency))

    def open(self) -> None:
        """Load the model once per worker; reading it from disk takes about a second."""
        self._model = local_model.load(
            self.model_name, device=str(self.params["device"]), threads=self._threads()
        )
        self._window = int(self._model.max_seq_length or 0)
        logger.debug("%s: %s on %s", self.name, self.model_name, self._model.device)

    def process(self, items: list[Item]) -> list[Item]:
        """One forward pass over all `items`; each comes back with its "vector"."""
        if not items:
            return []
        model = self._model
        if model is None:
            raise RuntimeError(f"{self.name}: open() was not called")
        texts = texts_of(items)
        self._count_cut(model, texts)
        vectors = local_model.encode(model, texts, batch=int(self.params["batch"]))
        return [
            Item(item.doc, {**item.data, "vector": vector, "model": self.model_name})
            for item, vector in zip(items, vectors, strict=True)
        ]

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Embed a query the way chunks are embedded (the QueryEmbedder protocol)."""
        if not texts:
            return []
        if self._model is None:
            raise RuntimeError(f"{self.name}: open() was not called")
        vectors = local_model.encode(self._model, texts, batch=int(self.params["batch"]))
        rows: list[list[float]] = vectors.tolist()
        return rows

    def _count_cut(self, model: SentenceTransformer, texts: list[str]) -> None:
        """Count, with the model's own tokenizer, the texts longer than its window."""
        if not self._window:
            return
        tokens = model.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        counter = WindowCounter(self._window, model=self.model_name, source="")
        counter.count_exact(texts, [len(t) for t in tokens])
        self.counts[("local_embed_chunks", "fit")] += counter.texts - counter.over
        self.counts[("local_embed_chunks", "cut")] += counter.over
        self.counts[("local_embed_cut_size", "chars")] += counter.chars
        self.counts[("local_embed_cut_size", "tokens")] += counter.tokens

    def notes(self) -> list[str]:
        """How many chunks the model cut, from the counts the workers sent back."""
        cut = self.counts[("local_embed_chunks", "cut")]
        window = local_model.model_window(self.model_name)
        if not cut or window is None:
            return []
        counter = WindowCounter(
            window, model=self.model_name, source="the model's max_seq_length", estimated=False
        )
        counter.texts = cut + self.counts[("local_embed_chunks", "fit")]
        counter.over = cut
        counter.chars = self.counts[("local_embed_cut_size", "chars")]
        counter.tokens = self.counts[("local_embed_cut_size", "tokens")]
        note = counter.note()
        return [note] if note else []

    def close(self) -> None:
        self._model = None
