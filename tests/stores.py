"""Reading what a run stored, for tests that compare collections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.qdrant import Upsert

__all__ = ["collection"]


def collection(
    folder: Path, *, store_folder: str = "qdrant", name: str = "docs"
) -> dict[str, tuple[list[float], dict[str, Any]]]:
    """Every point of the Edge store at `folder/store_folder`, collection `name`, as
    id -> (vector, payload)."""
    store = Upsert({"path": folder / store_folder, "collection": name}, name="store")
    store.open()
    try:
        return store.points()
    finally:
        store.close()
