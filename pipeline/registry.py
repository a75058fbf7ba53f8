"""Find a stage class from the `uses:` text of a config.

Stages are plugins: a kind such as `pdf.extract` names an entry point in the
`pipeline.stages` group, so the engine never imports the `stages` package and a
third-party package adds a stage by declaring an entry point. A
`package.module:ClassName` path works too, for stages that are not installed
as plugins (tests, one-off experiments).

The installed entry points are read once per process (a scan of every installed
distribution: ~30 ms with the extras installed, once per stage otherwise); a
plugin installed meanwhile is seen by the next `pipeline` command.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import EntryPoint, entry_points

from pipeline.stage import StageBase

__all__ = ["GROUP", "known_kinds", "resolve"]

GROUP = "pipeline.stages"


def known_kinds() -> list[str]:
    """The installed stage kinds (entry point names), sorted for stable messages."""
    return sorted({ep.name for ep in _installed()})


@functools.cache
def _installed() -> tuple[EntryPoint, ...]:
    return tuple(entry_points(group=GROUP))


def resolve(uses: str) -> type[StageBase]:
    """The stage class that `uses` names: an entry point name or a `module:Class` path.

    Raises LookupError when the name is unknown, the import fails or the object
    is not a StageBase subclass; the message says which, so the config loader
    can report it at the `uses:` line.
    """
    found = _import_path(uses) if ":" in uses else _load_entry_point(uses)
    if not (isinstance(found, type) and issubclass(found, StageBase)):
        raise LookupError(f"{uses} is not a stage class (a subclass of pipeline.stage.StageBase)")
    return found


def _load_entry_point(kind: str) -> object:
    matches: list[EntryPoint] = [ep for ep in _installed() if ep.name == kind]
    if not matches:
        kinds = ", ".join(known_kinds()) or "none installed"
        raise LookupError(f"unknown stage kind {kind!r}; known kinds: {kinds}")
    try:
        return matches[0].load()
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"cannot load {kind} ({matches[0].value}): {exc}") from exc


def _import_path(path: str) -> object:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise LookupError(f"{path!r} is not a package.module:ClassName path")
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"cannot import {module_name}: {exc}") from exc
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            raise LookupError(f"{module_name} has no {qualname}") from exc
    return found
