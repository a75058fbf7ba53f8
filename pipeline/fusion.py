"""Operator fusion: a stage runs inside the process of the stage before it.

Every item a stage's pool hands back passes through the engine's process, the one
process every chunk passes through and, on a machine with many cores, the ceiling
of the whole pipeline. So, as Ray Data and Spark fuse map operators, a stage that
declares itself `FUSIBLE` runs where the stage before it already runs, on the same
call, when that is a process of its own:

    host                                fused stage       runs in
    process pool                        process pool      each of the host's workers:
                                                          pages never leave the worker,
                                                          only chunks do (text.chunk)
    async pool, `own_process: true`     thread pool       the host's child process, on
                                                          threads of its own: vectors
                                                          never come back to the engine,
                                                          only which items were stored
                                                          (qdrant.upsert)

Only with the local executor: on Ray, thread stages stay on the driver (an
embedded store is written from one place only), and process stages fuse as
above.

The YAML still lists it as its own stage (reordering or removing it stays an edit);
`pipeline validate` shows the fusion; `pool: {kind: thread}` on a stage after a
process pool, or `own_process: false` on an async host, undoes it. Its failures are
still its own: what the fused stage raises fails the document at that stage's name
(a timeout of the whole call, or the death of the process, at the host's). Its items
and time are counted under its name too (`pools.FusedWork`, sent back with each of the
host's calls): the live view, the metrics and the report show it. Its own
`queue`, `timeout_s`, `retry` and batch size give way to the host's, which bound the
whole call. On threads, as on a thread pool, a call that timed out runs on to its
end; a fused stage's later calls (a discard) wait for it when it has one thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import StageConfig

__all__ = ["declared", "fuse", "overridden"]

# What a fused stage's host decides for the whole call, whatever the fused stage says;
# in a process pool's workers, how many there are and their memory cap too.
_HOSTS_OWN = ("queue", "linger_ms", "timeout_s", "retry", "with.batch")
_PROCESS_HOSTS_OWN = (*_HOSTS_OWN, "pool.size", "memory_mb")


def fuse(stages: Sequence[StageConfig], *, executor: str) -> tuple[StageConfig, ...]:
    """The stages to run on `executor`: each fusible stage folded into its host.
    Stages already fused are unfolded first, so a config can be fused again for
    another executor."""
    out: list[StageConfig] = []
    for stage in declared(stages):
        host = out[-1] if out else None
        if host is not None and stage.cls.FUSIBLE and _hosts(host, stage, executor):
            out[-1] = dataclasses.replace(host, fused=(*host.fused, stage))
        else:
            out.append(stage)
    return tuple(out)


def declared(stages: Sequence[StageConfig]) -> list[StageConfig]:
    """The stages as pipeline.yaml lists them, hosts and fused stages unfolded."""
    return [
        one
        for stage in stages
        for one in (dataclasses.replace(stage, fused=()) if stage.fused else stage, *stage.fused)
    ]


def _hosts(host: StageConfig, stage: StageConfig, executor: str) -> bool:
    if host.pool.kind == "process":
        return stage.pool.kind == "process"
    own = host.pool.kind == "async" and host.pool.own_process and executor == "local"
    return own and stage.pool.kind == "thread"


def overridden(stages: Sequence[StageConfig]) -> list[str]:
    """A line for each fused stage whose YAML sets what its host decides instead
    (its queue, timeout, retries, batch): the setting would do nothing, silently."""
    lines = []
    for host in stages:
        owned = _PROCESS_HOSTS_OWN if host.pool.kind == "process" else _HOSTS_OWN
        for stage in host.fused:
            keys = [key for key in owned if key in stage.set_keys]
            if keys:
                verb = "is" if len(keys) == 1 else "are"
                lines.append(
                    f"{stage.name}: {', '.join(keys)} set on it {verb} not used: it runs "
                    f"inside the calls of {host.name}, which {host.name}'s settings bound "
                    "(pipeline/fusion.py)"
                )
    return lines
