"""The Ray executor: the same pipeline.yaml and stages on a Ray cluster.

`executor: ray` (or `pipeline run --executor ray`) keeps everything the local
executor has (`pipeline.executor`) and moves the stages' work onto Ray:

    process-pool stage   Ray tasks of one CPU, up to `pool.size` at once, spread over
                         the nodes (a local model's tasks also get a GPU each where
                         the cluster has GPUs); a Ray worker process builds the stage
                         and the stages fused into it on its first task and keeps them
    async-pool stage     one async actor (`_Async`) running up to `pool.size` calls at
                         once; the driver's adaptive limit decides how many are in
                         flight, so together they never overload the API
    thread-pool stage    the driver's own threads, as locally: an embedded store is
                         written from one place only

Ray schedules the tasks and the actor, moves the items, and re-runs a call whose
worker or node died (`max_retries`, `max_task_retries`; an actor is restarted), so
a node lost mid-run loses no document. The driver keeps the one record of
outcomes: document-level errors come back as values, not failed Ray calls, and are
accounted exactly as locally. A call past the stage's `timeout_s` is cancelled,
its worker killed, and its items fail. Backpressure is the engine's own bounded
channels: the driver hands Ray no more than the queues hold, and the source stays
a lazy walk on the driver.

Without `ray.address`, a Ray instance is started for the run, on 127.0.0.1 only
(Ray's ports have no authentication; `pipeline.executor` sets Ray's
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported, which is what keeps
every Ray process on loopback), and stopped after it, even if the run is killed
(`pipeline.ray_reaper`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import OutOfMemoryError, RayError

from pipeline.errors import FatalError, PermanentError, PipelineError, StageError
from pipeline.pools import PoolBase, StageSpec, ThreadPool, build_chain, run_chain
from pipeline.ray_reaper import start_reaper
from pipeline.stage import AsyncStage, Item, PoolKind, Stage, StageBase

if TYPE_CHECKING:
    from pipeline.config import RayConfig, StageConfig
    from pipeline.pools import Pool

__all__ = ["RayExecutor", "ray_placement"]

logger = logging.getLogger(__name__)

_CALL_RETRIES = 2  # re-runs of a call whose worker died (its node lost, a segfault)
_BATCHES_PER_TASK = 4
_START_S = 5.0  # added to a call's timeout: Ray starting a worker process for it
# ("ok", (items, fused work, counts, notes), node) or ("error", exc, node)
_Result = tuple[str, Any, str]


def _node() -> str:
    return str(ray.get_runtime_context().get_node_id())[:12]


def _failed(exc: Exception) -> PipelineError:
    """What a call's exception means to the driver: a stage's error or a fatal one as
    it is, anything else a bug in the stage that fails its items."""
    if isinstance(exc, StageError | FatalError):
        return exc
    return PermanentError(f"{type(exc).__name__}: {exc}", reason="bug")


# A worker process's own copies of the chains it ran, built and opened on its first
# task: Ray keeps worker processes for further tasks, so a model loads once a worker.
_chains: dict[str, list[Stage]] = {}


@ray.remote  # type: ignore[untyped-decorator]
def _run_blocking(key: str, chain: list[StageSpec], workers: int, items: list[Item]) -> _Result:
    """One call of a process-pool stage (and the stages fused into it) as a Ray task."""
    try:
        stages = _chains.get(key)
        if stages is None:
            stages = _chains[key] = build_chain(chain, workers=workers)
        return ("ok", (*run_chain(stages, items), []), _node())
    except Exception as exc:  # noqa: BLE001 - errors ride back as values
        return ("error", _failed(exc), _node())


@ray.remote
class _Async:
    """An async stage: one copy, many calls at once on the actor's event loop."""

    def __init__(self, spec: StageSpec, workers: int) -> None:
        from pipeline import registry

        stage = registry.resolve(spec.uses)(spec.params, name=spec.name, concurrency=workers)
        if not isinstance(stage, AsyncStage):
            raise TypeError(f"{spec.uses} is not an async stage")
        self._stage = stage
        self._open = False
        self._opening = asyncio.Lock()

    async def ready(self) -> str:
        await self._opened()
        return _node()

    async def _opened(self) -> AsyncStage:
        """The stage, opened once: also after Ray restarts the actor (its node lost),
        which runs `__init__` again but not `ready`."""
        async with self._opening:
            if not self._open:
                await self._stage.open()
                self._open = True
        return self._stage

    async def run(self, items: list[Item]) -> _Result:
        try:
            stage = await self._opened()
            out = await stage.process(items)
        except Exception as exc:  # noqa: BLE001 - errors ride back as values
            return ("error", _failed(exc), _node())
        counts, stage.counts = stage.counts, Counter()
        return ("ok", (out, [], counts, stage.notes()), _node())

    async def close(self) -> None:
        await self._stage.close()


class RayPool(PoolBase):
    """A stage's Ray calls, seen by the runner as any other pool: `call(items)` makes
    one (a task, or a call of the stage's actor)."""

    def __init__(
        self,
        stage: StageBase,
        *,
        kind: PoolKind,
        call: Callable[[list[Item]], Any],
        actors: Sequence[Any] = (),
        timeout_s: float | None,
    ) -> None:
        self.kind = kind
        self.size = stage.concurrency
        # A Ray call costs a few milliseconds of scheduling and object transfer: a
        # process-pool stage's calls carry several of its batches (a failing call is
        # split by the engine, so a bad document still fails alone).
        self._batches = _BATCHES_PER_TASK if kind == "process" else 1
        self.batch_size = stage.batch_size * self._batches
        self.stage = stage  # a tally: the workers send their counts back with each call
        self._call = call
        self._actors = list(actors)
        self._timeout_s = timeout_s
        self._nodes: Counter[str] = Counter()
        self._notes: list[str] = []

    def nodes(self) -> dict[str, int]:
        return dict(self._nodes)

    def notes(self) -> list[str]:
        """The actor's latest notes; a task stage's come from the counts sent back."""
        return self._notes or self.stage.notes()

    async def open(self) -> None:
        """Wait for every actor to start and open its stages: a stage that cannot open
        (a missing model, a bad key) stops the run before any document is handed on."""
        try:
            await asyncio.gather(*(_wait(a.ready.remote()) for a in self._actors))
        except RayError as exc:
            raise FatalError(f"{self.stage.name}: its Ray workers could not start: {exc}") from exc

    async def run(self, items: list[Item]) -> list[Item]:
        ref = self._call(items)
        # `timeout_s` bounds one of the stage's own batches; a call carrying several
        # gets as many (a call that times out is split, and each batch tried alone),
        # plus the time Ray may take to start a worker for it (one was just killed).
        batches = -(-len(items) // max(1, self.batch_size // self._batches))
        timeout = None if self._timeout_s is None else self._timeout_s * batches + _START_S
        try:
            status, value, node = await asyncio.wait_for(_wait(ref), timeout)
        except TimeoutError:
            # A hung task's worker is killed (Ray starts another); an actor's call is
            # cancelled in its event loop (actors cannot be force-cancelled).
            ray.cancel(ref, force=self.kind == "process")
            raise PermanentError(f"timed out after {timeout:g} s", reason="timeout") from None
        except OutOfMemoryError:
            message = "Ray's memory monitor killed its worker"
            raise PermanentError(message, reason="out_of_memory") from None
        except RayError as exc:  # its worker or node died, its result was lost: past retries
            raise PermanentError(f"worker died: {exc}", reason="worker_died") from None
        self._nodes[node] += len(items)
        if status == "error":
            raise value
        out, work, counts, notes = value
        self._add_fused(work)
        self.stage.counts.update(counts)
        self._notes = notes or self._notes  # an actor's notes so far, as of this call
        return list(out)

    async def discard(self, docs: Sequence[str]) -> None:
        del docs  # only stores keep documents, and stores run on the driver

    async def close(self) -> None:
        for actor in self._actors:
            if self.kind == "async":
                try:
                    await _wait(actor.close.remote())
                except RayError:
                    logger.warning("%s: closing its Ray actor failed", self.stage.name)
            ray.kill(actor, no_restart=True)


async def _wait(ref: Any) -> Any:
    return await asyncio.wrap_future(ref.future())


class RayExecutor:
    """Stages on Ray actors; thread stages (an embedded store) on the driver."""

    name = "ray"

    def __init__(self, config: RayConfig) -> None:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        self._reaper = None
        if config.address is None:
            # Ours to stop, even if this process is killed (see pipeline.ray_reaper).
            self._reaper = start_reaper()
            options["_node_ip_address"] = "127.0.0.1"
            options["num_cpus"] = config.num_cpus
            if config.object_store_mb is not None:
                options["object_store_memory"] = config.object_store_mb * 1024 * 1024
        else:
            options["address"] = config.address
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._stop_reaper()
            where = config.address or "a local instance"
            raise FatalError(f"cannot start or join Ray ({where}): {exc}") from exc

    def open_pool(self, cfg: StageConfig, *, sink: bool = False) -> Pool:
        del sink  # outputs come back through Ray's object store either way
        stage = cfg.cls(cfg.params, name=cfg.name, concurrency=cfg.pool.size)
        if cfg.pool.kind == "thread":
            if not isinstance(stage, Stage):
                raise TypeError(f"{cfg.uses} is not a blocking stage")
            return ThreadPool(stage, size=cfg.pool.size, timeout_s=cfg.timeout_s)
        if cfg.pool.kind == "async":
            spec = StageSpec(cfg.uses, cfg.name, dict(cfg.params))
            actor = _Async.options(  # type: ignore[attr-defined]
                num_cpus=0,
                max_concurrency=cfg.pool.size,
                max_restarts=-1,
                max_task_retries=_CALL_RETRIES,
            ).remote(spec, cfg.pool.size)
            return RayPool(
                stage,
                kind="async",
                call=actor.run.remote,
                actors=[actor],
                timeout_s=cfg.timeout_s,
            )
        chain = [
            StageSpec(cfg.uses, cfg.name, dict(cfg.params)),
            *(StageSpec(f.uses, f.name, dict(f.params)) for f in cfg.fused),
        ]
        # A local model gets a GPU per call where the cluster has GPUs (Ray's own
        # batch-inference layout); everything else one CPU.
        cluster: dict[str, float] = ray.cluster_resources()
        gpus = 1 if stage.wants_gpu() and cluster.get("GPU", 0) > 0 else 0
        task = _run_blocking.options(
            num_cpus=1, num_gpus=gpus, max_retries=_CALL_RETRIES, scheduling_strategy="SPREAD"
        )
        return RayPool(
            stage,
            kind="process",
            call=lambda items: task.remote(cfg.name, chain, cfg.pool.size, items),
            timeout_s=cfg.timeout_s,
        )

    def close(self) -> None:
        ray.shutdown()  # disconnects; a local instance started for the run stops
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        reaper = self._reaper
        if reaper is not None and reaper.stdin is not None:
            reaper.stdin.close()  # the reaper sweeps up what did not stop, then exits
            threading.Thread(target=reaper.wait, daemon=True).start()  # no zombie left


def ray_placement(cfg: StageConfig) -> str:
    """How `cfg` runs on Ray, for `pipeline validate`."""
    if cfg.pool.kind == "thread":
        return f"on the driver, {cfg.pool.size} thread(s)"
    if cfg.pool.kind == "async":
        return f"1 async Ray actor, up to {cfg.pool.size} calls at once"
    return f"Ray tasks x 1 CPU, up to {cfg.pool.size} at once, spread over the nodes"
