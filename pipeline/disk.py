"""Free space under the run's state and store, watched so a full disk stops a run cleanly.

An embedded store memory-maps its files and grows them as points arrive; on a
filesystem that fills up, growing into space that is not there ends the process
with SIGBUS, no message and no summary. So the run watches the free space of
every filesystem it writes to (the state database's folder, and every folder a
stage is configured with, such as an embedded store's `path`) and stops before
that: below `min_free_mb` intake stops, what is in flight is drained, the state
is saved and the run exits 3 naming the path and the space left. The check also
runs before any work starts. Any write error that gets through anyway (ENOSPC,
EIO, a read-only filesystem) ends the same way, from the state (`pipeline.state`)
or the store (the stage's FatalError).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import PipelineConfig

__all__ = ["CHECK_EVERY_S", "free_mb", "low_space", "written_paths"]

CHECK_EVERY_S = 1.0


def written_paths(config: PipelineConfig) -> list[Path]:
    """The folders the run writes to: the state's, and every stage `path` parameter's."""
    found = [config.state.parent]
    for stage in config.stages:
        for each in (stage, *stage.fused):
            for name, param in each.cls.PARAMS.items():
                value = each.params.get(name)
                if param.type == "path" and value is not None:
                    found.append(Path(value))
    unique: dict[Path, None] = dict.fromkeys(found)
    return list(unique)


def free_mb(path: Path) -> float | None:
    """Megabytes free for us on the filesystem holding `path` (or its nearest existing
    parent, for a folder not created yet); None if that cannot be asked."""
    for candidate in (path, *path.parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize / 2**20
    return None


def low_space(paths: Iterable[Path], min_free_mb: float) -> str | None:
    """Why the run must not write on, if one of `paths` has less than `min_free_mb` free."""
    for path in paths:
        free = free_mb(path)
        if free is not None and free < min_free_mb:
            return (
                f"only {free:.0f} MB free on the filesystem of {path} (min_free_mb: "
                f"{min_free_mb:g}): free some space and run again; the run resumes"
            )
    return None
