"""Load pipeline.yaml once into frozen dataclasses, or fail naming file, line and key.

Every mistake is a ConfigError rendered as `pipeline.yaml:14: stages[2].pool.size:
expected a positive integer or "auto", got "many"`, raised before any work, so the
CLI can exit 2 with nothing half done. The loader reads the file and the
environment and writes nothing.

The YAML is composed into nodes (which carry line numbers) and constructed into
plain values from the same parse; values are checked against the key tables of
`pipeline.schema`, and on failure `Lines` walks the node tree along the failing
key path to find the line to report. Secrets never come from YAML: a key named
`api_key` anywhere is refused (without echoing it), and `env` parameters hold
the name of a variable that must be set, never its value.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pipeline.errors import ConfigError
from pipeline.fusion import fuse
from pipeline.registry import known_kinds, resolve
from pipeline.schema import (
    POOL,
    RAY,
    RETRY,
    SOURCE,
    STAGE,
    TOP,
    WATCH,
    Invalid,
    Key,
    param_key,
)
from pipeline.stage import PoolKind, StageBase
from pipeline.yamlfile import KeyPath, Lines, parse, render

__all__ = [
    "PipelineConfig",
    "RayConfig",
    "PoolConfig",
    "RetryConfig",
    "SourceConfig",
    "StageConfig",
    "WatchConfig",
    "cpu_count",
    "load_config",
    "ray_installed",
]


@dataclass(frozen=True, slots=True)
class PoolConfig:
    kind: PoolKind
    size: int  # "auto" is already resolved to the CPU count; the ceiling when adaptive
    adaptive: bool = False  # calls in flight follow the server (pipeline.limit)
    own_process: bool = False  # an async pool's loop in a child (pipeline.async_process)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 5  # total tries, the first included
    base_s: float = 0.5
    cap_s: float = 30.0
    max_wait_s: float = 180.0  # how long an unavailable server is waited for


@dataclass(frozen=True, slots=True)
class StageConfig:
    name: str
    uses: str
    cls: type[StageBase]
    pool: PoolConfig
    queue: int  # capacity of the channel feeding this stage
    linger_ms: float | None  # None: the engine's default for the stage's batch size
    timeout_s: float | None
    memory_mb: int | None
    retry: RetryConfig
    # Checked, defaults filled, paths absolute. A plain dict (typed read-only) so it
    # pickles into worker processes; left out of the hash because dicts have none.
    params: Mapping[str, Any] = field(hash=False)
    line: int
    fused: tuple[StageConfig, ...] = ()  # run in this stage's process(es) (pipeline.fusion)
    # The keys its YAML sets to something ("queue", "with.batch", "pool.size"): a fused
    # stage's engine settings give way to its host's, and `pipeline validate` says so.
    set_keys: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SourceConfig:
    path: Path
    glob: str = "**/*.pdf"
    prune: bool = True


@dataclass(frozen=True, slots=True)
class WatchConfig:
    settle_s: float = 2.0  # a file is read once stable this long
    rescan_s: float = 300.0  # a full walk this often, for lost events


@dataclass(frozen=True, slots=True)
class RayConfig:
    address: str | None = None  # None: a local instance for the run, on loopback
    num_cpus: int | None = None
    object_store_mb: int | None = None


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    file: Path  # as the user gave it, so later messages name it the same way
    source: SourceConfig
    state: Path
    stages: tuple[StageConfig, ...]
    shutdown_timeout_s: float = 30.0
    min_free_mb: float = 256.0  # below this on the state's or store's filesystem: stop
    watch: WatchConfig = WatchConfig()
    executor: str = "local"  # where stages run: pipeline.executor
    ray: RayConfig = RayConfig()


def cpu_count() -> int:
    """CPUs this process may run on (what "auto" means): the affinity mask, not the
    machine, so a container limited to 2 CPUs does not start 64 workers."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _remote(address: str | None) -> bool:
    """Whether a Ray address names another machine's cluster (not this machine's)."""
    if address is None or address in ("auto", "local"):
        return False
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    return host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def ray_installed() -> bool:
    """Whether Ray can be imported, without importing it (a second or more)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def load_config(
    path: Path, *, source: Path | None = None, env: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Read, check and resolve `path`; raises ConfigError on the first mistake.

    `source` (the CLI's --source, relative to the working folder) replaces
    source.path, which may then be left out. `env` (default os.environ) is only
    asked whether the variables that `env` parameters name are set.
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(file, "", f"a readable config file ({reason})", show_got=False) from exc
    root, data = parse(file, text)
    loader = _Loader(file, Lines(root), path.resolve().parent, os.environ if env is None else env)
    return loader.pipeline(data, path, source)


def _set_keys(raw: Mapping[str, Any]) -> frozenset[str]:
    """The keys a stage's YAML sets to something (an empty section or null sets
    nothing), sections' keys as "section.key"."""
    keys: set[str] = set()
    for key, value in raw.items():
        if isinstance(value, Mapping):
            keys.update(f"{key}.{inner}" for inner, v in value.items() if v is not None)
            if value:
                keys.add(key)
        elif value is not None:
            keys.add(key)
    return frozenset(keys)


class _Loader:
    """One load: knows the file (for messages), its lines, its folder and the env."""

    def __init__(self, file: str, lines: Lines, base: Path, env: Mapping[str, str]) -> None:
        self.file = file
        self.lines = lines
        self.base = base
        self.env = env

    def fail(
        self,
        at: KeyPath,
        expected: str,
        got: object = None,
        *,
        of_key: bool = False,
        show_got: bool = True,
    ) -> ConfigError:
        """The error at `at`, at the line of its value (or of the key itself)."""
        line = self.lines.line(at, of_key=of_key)
        got = _Shown(got) if isinstance(got, dict | list) else got
        return ConfigError(self.file, render(at), expected, line=line, got=got, show_got=show_got)

    def section(
        self,
        raw: Mapping[Any, Any],
        at: KeyPath,
        keys: Mapping[str, Key],
        *,
        waive: Set[str] = frozenset(),
    ) -> dict[str, Any]:
        """Check a mapping against its key table; returns every key, defaults filled.

        Unknown keys are reported before missing ones: a misspelt required key is
        both, and "did you mean" is the more useful message.
        """
        for name in raw:
            if name not in keys:
                if keys:
                    expected = "one of " + ", ".join(keys)
                    close = difflib.get_close_matches(str(name), list(keys), n=1)
                    expected += f' (did you mean "{close[0]}"?)' if close else ""
                else:
                    expected = "no keys here (it takes no parameters)"
                raise self.fail((*at, str(name)), expected, of_key=True, show_got=False)
        out: dict[str, Any] = {}
        for name, key in keys.items():
            if name not in raw:
                if key.required and name not in waive:
                    raise self.fail((*at, name), f"{key.rule.expected} (required)")
                out[name] = key.default
            elif raw[name] is None and key.nullable:
                out[name] = None
            else:
                try:
                    out[name] = key.rule.check(raw[name])
                except Invalid as exc:
                    got, echo = raw[name], exc.echo
                    raise self.fail((*at, name), str(exc), got, show_got=echo) from None
        return out

    def pipeline(self, data: object, path: Path, source: Path | None) -> PipelineConfig:
        if not isinstance(data, dict):
            expected = "a mapping with the keys " + ", ".join(TOP)
            raise self.fail((), expected, _Shown(data) if data is not None else None)
        top = self.section(data, (), TOP, waive={"source"} if source is not None else set())
        if top["executor"] == "ray" and not ray_installed():
            expected = "local, or Ray installed for ray: pip install '.[ray]'"
            raise self.fail(("executor",), expected, "ray")
        src = self.source(top["source"], source)
        names: dict[str, int] = {}
        stages = tuple(self.stage(index, raw, names) for index, raw in enumerate(top["stages"]))
        ray = RayConfig(**self.section(top["ray"] or {}, ("ray",), RAY))
        if top["executor"] == "ray" and _remote(ray.address):
            self.driver_paths(stages)
        return PipelineConfig(
            file=path,
            source=src,
            state=self.resolve_path(top["state"]),
            stages=fuse(stages, executor=top["executor"]),
            shutdown_timeout_s=top["shutdown_timeout_s"],
            min_free_mb=top["min_free_mb"],
            watch=WatchConfig(**self.section(top["watch"] or {}, ("watch",), WATCH)),
            executor=top["executor"],
            ray=ray,
        )

    def driver_paths(self, stages: tuple[StageConfig, ...]) -> None:
        """On a remote Ray cluster, a stage whose workers run on other machines cannot
        use a folder of the driver's (a store, a file): refuse it before any work."""
        for index, stage in enumerate(stages):
            if stage.pool.kind != "process":
                continue  # thread stages run on the driver, async ones only call out
            for name, param in stage.cls.PARAMS.items():
                if param.type == "path" and stage.params.get(name) is not None:
                    expected = (
                        "no path of the driver's on a stage that runs on the cluster's nodes "
                        "(executor ray with a remote ray.address): pool kind thread runs it "
                        "on the driver"
                    )
                    got = str(stage.params[name])
                    raise self.fail(("stages", index, "with", name), expected, got)

    def source(self, raw: Mapping[str, Any] | None, override: Path | None) -> SourceConfig:
        waive = {"path"} if override is not None else set()
        values = self.section(raw or {}, ("source",), SOURCE, waive=waive)
        if override is not None:
            folder = override.expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(self.file, "--source", "an existing folder", got=str(folder))
        else:
            folder = self.resolve_path(values["path"])
            if not folder.is_dir():
                raise self.fail(("source", "path"), "an existing folder", str(folder))
        return SourceConfig(path=folder, glob=values["glob"], prune=values["prune"])

    def stage(self, index: int, raw: Mapping[str, Any], names: dict[str, int]) -> StageConfig:
        at: KeyPath = ("stages", index)
        if not isinstance(raw, dict):
            raise self.fail(at, "a mapping (one stage)", raw)
        values = self.section(raw, at, STAGE)
        name, uses = values["name"], values["uses"]
        if name in names:
            raise self.fail(
                (*at, "name"), f"a name no other stage has (stages[{names[name]}])", name
            )
        names[name] = index
        cls = self.stage_class(uses, (*at, "uses"))
        pool = self.pool(values["pool"], (*at, "pool"), cls, uses)
        if values["memory_mb"] is not None and pool.kind != "process":
            expected = f"no memory_mb on this {pool.kind} pool (the cap is per worker process)"
            raise self.fail((*at, "memory_mb"), expected, values["memory_mb"])
        return StageConfig(
            name=name,
            uses=uses,
            cls=cls,
            pool=pool,
            queue=values["queue"] if values["queue"] is not None else 2 * pool.size,
            linger_ms=values["linger_ms"],
            timeout_s=values["timeout_s"],
            memory_mb=values["memory_mb"],
            retry=self.retry(values["retry"], (*at, "retry")),
            params=self.params(values["with"] or {}, (*at, "with"), cls),
            line=self.lines.line(at) or 1,
            set_keys=_set_keys(raw),
        )

    def stage_class(self, uses: str, at: KeyPath) -> type[StageBase]:
        try:
            return resolve(uses)
        except LookupError as exc:
            kinds = known_kinds()
            if ":" in uses or uses in kinds:  # found but broken: say why
                raise self.fail(at, f"an importable stage class ({exc})", uses) from exc
            expected = f"a known stage kind ({', '.join(kinds)}) or a package.module:Class path"
            close = difflib.get_close_matches(uses, kinds, n=1)
            expected += f' (did you mean "{close[0]}"?)' if close else ""
            raise self.fail(at, expected, uses) from exc

    def pool(
        self, raw: Mapping[str, Any] | None, at: KeyPath, cls: type[StageBase], uses: str
    ) -> PoolConfig:
        values = self.section(raw or {}, at, POOL)
        kind = values["kind"] if values["kind"] is not None else cls.POOLS[0]
        if kind not in cls.POOLS:
            expected = f"one of {', '.join(cls.POOLS)} (the pools {uses} runs on)"
            raise self.fail((*at, "kind"), expected, kind)
        size = values["size"] if values["size"] is not None else cls.DEFAULT_SIZE
        adaptive = values["adaptive"] if values["adaptive"] is not None else kind == "async"
        if adaptive and kind == "process":
            expected = "false on a process pool (its workers are CPU-bound, not a server's)"
            raise self.fail((*at, "adaptive"), expected, adaptive)
        if values["own_process"] and kind != "async":
            expected = f"false on a {kind} pool (only an async pool's loop moves to a process)"
            raise self.fail((*at, "own_process"), expected, values["own_process"])
        return PoolConfig(
            kind=cast(PoolKind, kind),
            size=cpu_count() if size == "auto" else size,
            adaptive=adaptive,
            own_process=values["own_process"],
        )

    def retry(self, raw: Mapping[str, Any] | None, at: KeyPath) -> RetryConfig:
        values = self.section(raw or {}, at, RETRY)
        if values["cap_s"] < values["base_s"]:
            expected = f"a number >= base_s ({values['base_s']:g})"
            raise self.fail((*at, "cap_s"), expected, values["cap_s"])
        return RetryConfig(**values)

    def params(
        self, raw: Mapping[str, Any], at: KeyPath, cls: type[StageBase]
    ) -> Mapping[str, Any]:
        """Check `with:` against cls.PARAMS, then cls.check for cross-key mistakes.

        YAML reads a bare `off` as false: for a choice that includes "off" (`ocr:
        off`), false means "off", as the person who wrote it meant."""
        raw = {
            name: "off"
            if value is False and "off" in getattr(cls.PARAMS.get(name), "choices", ())
            else value
            for name, value in raw.items()
        }
        values = self.section(raw, at, {name: param_key(p) for name, p in cls.PARAMS.items()})
        for name, param in cls.PARAMS.items():
            value = values[name]
            if value is None:
                continue
            if param.type == "path":
                values[name] = self.resolve_path(value)
            elif param.type == "model" and self.resolve_path(value).is_dir():
                values[name] = str(self.resolve_path(value))
            elif param.type == "env" and value not in self.env:
                expected = f"the name of a set environment variable, {value} is not set"
                raise self.fail((*at, name), expected, show_got=False)
        problems = cls.check(dict(values))
        if problems:  # one error per run, like every other mistake: the first
            raise self.fail((*at, problems[0].key), problems[0].expected, problems[0].got)
        return values

    def resolve_path(self, value: str) -> Path:
        """Relative to the config file's folder, so a run works from any directory."""
        return (self.base / Path(value).expanduser()).resolve()


class _Shown:
    """Stands in for a list or mapping in a message: "got a list", not its contents."""

    def __init__(self, value: object) -> None:
        self.text = "a mapping" if isinstance(value, dict) else f"a {type(value).__name__}"

    def __repr__(self) -> str:
        return self.text
