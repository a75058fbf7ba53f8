"""Operator fusion: a cheap stage runs inside the worker processes of the stage before it.

Chunking a document takes a fraction of the time extracting it does. Run as its own
stage it would cost the engine's process a channel round trip, a thread hop and the
pickled pages of every document; on a machine with many cores that process is the
ceiling of the whole pipeline. So, as Ray Data and Spark fuse map operators, a stage
that declares itself `FUSIBLE` and is set to run on a process pool right after a
process-pool stage runs in that stage's workers, on the same call: pages never
leave the worker, only chunks do.

The YAML still lists it as its own stage (reordering or removing it stays an edit);
`pipeline validate` shows the fusion; `pool: {kind: thread}` on the fused stage
undoes it. Its failures are still its own: a document failing in the fused stage
is recorded at that stage's name. Its own `queue`, `timeout_s` and `retry` give way
to the host's, which bound the whole call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import StageConfig

__all__ = ["fuse"]


def fuse(stages: Sequence[StageConfig]) -> tuple[StageConfig, ...]:
    """The stages to run: each fusible process-pool stage folded into the stage before."""
    out: list[StageConfig] = []
    for stage in stages:
        host = out[-1] if out else None
        if (
            host is not None
            and host.pool.kind == "process"
            and stage.pool.kind == "process"
            and stage.cls.FUSIBLE
        ):
            out[-1] = dataclasses.replace(host, fused=(*host.fused, stage))
        else:
            out.append(stage)
    return tuple(out)
