"""One collection, one vector space: the model that embeds must be the one that built it.

Vectors from two models are not comparable: a query embedded by one model against
chunks embedded by another returns noise with confident scores, and a collection
that mixes both is ruined for every query. Dimensions often agree (many models give
384), so a size check alone would not notice. So the store records the model that
built the collection, and before a run or a search the engine compares it with the
model the pipeline's embedding stage names. A mismatch is a config error naming both.

The engine knows no models: a stage that embeds says which model it uses
(`model_name`), a store says which model built what it holds (`recorded_model()`).
Names are compared as a user means them: `all-MiniLM-L6-v2`,
`sentence-transformers/all-MiniLM-L6-v2` and a folder `./models/all-MiniLM-L6-v2`
are the same model, served or in-process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pipeline.errors import ConfigError, StageError
from pipeline.fusion import declared

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["EmbeddingModel", "ModelRecord", "Recorded", "check_space", "same_model"]


@runtime_checkable
class EmbeddingModel(Protocol):
    """A stage that embeds: the model it uses, as pipeline.yaml names it."""

    @property
    def model_name(self) -> str: ...


@runtime_checkable
class ModelRecord(Protocol):
    """A store that remembers which model built its collection."""

    def recorded_model(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a store opened in another process said about its collection (a store
    fused into the embedder's process, pipeline.fusion): a ModelRecord to check,
    which raises what the store raised if it could not say."""

    model: str | None
    error: StageError | None = None

    def recorded_model(self) -> str | None:
        if self.error is not None:
            raise self.error
        return self.model


def same_model(a: str, b: str) -> bool:
    """Whether two names of a model name the same one: the last part, any case."""
    return _short(a) == _short(b)


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1].lower()


def check_space(config: PipelineConfig, copies: Mapping[str, object]) -> None:
    """Raise ConfigError if the store's collection was built by another model than the
    one the embedding stage uses. `copies` maps stage names to the engine's copies
    (the store's opened)."""
    embedder = store = None
    for index, cfg in enumerate(declared(config.stages)):  # YAML order
        copy = copies.get(cfg.name)
        if embedder is None and isinstance(copy, EmbeddingModel):
            embedder = (index, cfg, copy)
        if store is None and isinstance(copy, ModelRecord):
            store = (cfg, copy)
    if embedder is None or store is None:
        return
    index, cfg, stage = embedder
    recorded, model = store[1].recorded_model(), stage.model_name
    if recorded is None or same_model(recorded, model):
        return
    raise ConfigError(
        str(config.file),
        f"stages[{index}].with.model",
        f"{recorded!r}, the model that built the collection of stage {store[0].name!r} "
        "(vectors of two models do not compare): embed with it, or index into a new "
        "collection or store path to switch models",
        line=cfg.line,
        got=model,
    )
