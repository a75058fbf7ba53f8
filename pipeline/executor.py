"""Where a pipeline's stages run: the executor seam.

Both executors share everything but the pools: the config, the state database
(the one record of outcomes), the lazy intake, the ledger of per-document
outcomes, retries and dead letters, the bounded channels that hold memory flat,
metrics, the live view and the report. The runner drives the same loop either
way; an executor only decides where a stage's `process` calls run:

    local   `pipeline.pools`: worker processes, threads, the event loop
    ray     `pipeline.ray_executor`: Ray actors on a cluster (or a Ray started for
            the run), thread stages such as an embedded store on the driver

Stages are the same classes on both and never know which one runs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from pipeline.pools import Pool, StageSpec, open_pool

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, StageConfig

__all__ = ["Executor", "LocalExecutor", "open_executor", "placement"]


class Executor(Protocol):
    name: str

    def open_pool(self, cfg: StageConfig, *, sink: bool = False) -> Pool:
        """The pool that runs `cfg` (and the stages fused into it); `sink`: the
        pipeline's last stage, whose outputs the engine only counts."""

    def close(self) -> None:
        """Release what the executor started (a local Ray instance)."""


class LocalExecutor:
    """This machine's pools: `pipeline.pools`."""

    name = "local"

    def open_pool(self, cfg: StageConfig, *, sink: bool = False) -> Pool:
        return open_pool(
            cfg.cls,
            uses=cfg.uses,
            name=cfg.name,
            kind=cfg.pool.kind,
            size=cfg.pool.size,
            params=cfg.params,
            timeout_s=cfg.timeout_s,
            memory_mb=cfg.memory_mb,
            fused=[StageSpec(f.uses, f.name, dict(f.params), f.pool.size) for f in cfg.fused],
            own_process=cfg.pool.own_process,
            sink=sink,
        )

    def close(self) -> None:
        return None


def open_executor(config: PipelineConfig) -> Executor:
    """The executor `config` asks for; Ray is imported only when it is the one."""
    if config.executor == "ray":
        if config.ray.address is None:
            # A Ray started for this run stays on loopback, every process of it (Ray
            # reads this when imported): its ports have no authentication.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(config.ray)
    return LocalExecutor()


def placement(config: PipelineConfig, cfg: StageConfig) -> str:
    """How a stage maps onto the configured executor, for `pipeline validate`; empty
    for the local executor, whose pools the stage table already shows."""
    if config.executor != "ray":
        return ""
    from pipeline.ray_executor import ray_placement

    return ray_placement(cfg)
