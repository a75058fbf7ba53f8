"""The config loader: good files become frozen dataclasses, bad ones a precise ConfigError.

Each error test checks the whole address of the mistake (file, line, key path)
and the expectation, because that message is all a user gets before exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (
    PipelineConfig,
    PoolConfig,
    RetryConfig,
    SourceConfig,
    cpu_count,
    load_config,
)
from pipeline.errors import ConfigError
from pipeline.fusion import declared, fuse, overridden
from pipeline.registry import known_kinds, resolve
from pipeline.schema import RETRY, SOURCE
from pipeline.stage import StageBase
from tests.toy_stages import Double, Echo

DOUBLE = f"{Double.__module__}:Double"
ECHO = f"{Echo.__module__}:Echo"

GOOD = f"""\
source: {{path: pdfs}}
state: .pipeline/state.db
stages:
  - name: double
    uses: {DOUBLE}
  - name: echo
    uses: {ECHO}
    pool: {{kind: async, size: 8}}
    queue: 3
    timeout_s: 5
    retry: {{attempts: 2}}
    with:
      count: 2
      out: out/echo.txt
      key_env: TOY_KEY
"""
ENV = {"TOY_KEY": "never-read"}


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    (tmp_path / "pdfs").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`, so tests need no counting."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV if env is None else env)
    return caught.value


def assert_says(err: ConfigError, file: Path | str, line: int, key: str, expected: str) -> None:
    message = str(err)
    where = f"{file}:{line}: {key}: " if key else f"{file}:{line}: "
    assert message.startswith(where + "expected "), message
    assert expected in message, message
    assert (err.line, err.key) == (line, key)


# --- good configs -----------------------------------------------------------------


def test_good_config_loads_into_dataclasses_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_config(path, env=ENV)
    assert isinstance(config, PipelineConfig)
    assert config.file == path
    assert config.source == SourceConfig(path=(tmp_path / "pdfs").resolve())
    assert config.state == (tmp_path / ".pipeline/state.db").resolve()
    assert config.shutdown_timeout_s == 30.0
    double, echo = config.stages
    assert (double.name, double.uses, double.cls) == ("double", DOUBLE, Double)
    assert double.pool == PoolConfig(kind="process", size=cpu_count())  # DEFAULT_SIZE "auto"
    assert double.queue == 2 * cpu_count()
    assert (double.timeout_s, double.memory_mb, double.retry) == (None, None, RetryConfig())
    assert double.params == {"factor": 2}
    assert double.line == 4
    assert echo.pool == PoolConfig(kind="async", size=8, adaptive=True)
    assert (echo.queue, echo.timeout_s, echo.line) == (3, 5.0, 6)
    assert echo.retry == RetryConfig(attempts=2, base_s=0.5, cap_s=30.0)
    assert echo.params == {
        "count": 2,
        "ratio": 0.5,
        "label": "echo",
        "mode": "fast",
        "loud": False,
        "url": "http://127.0.0.1:8000/v1",
        "key_env": "TOY_KEY",
        "out": (tmp_path / "out/echo.txt").resolve(),
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.state = Path("elsewhere")  # type: ignore[misc]


def test_pool_size_auto_is_the_cpu_count_and_queue_defaults_to_twice_the_size(
    tmp_path: Path,
) -> None:
    text = GOOD.replace("pool: {kind: async, size: 8}\n    queue: 3", "pool: {size: auto}")
    echo = load_config(write(tmp_path, text), env=ENV).stages[1]
    assert echo.pool == PoolConfig(kind="async", size=cpu_count(), adaptive=True)
    assert echo.queue == 2 * cpu_count()
    assert cpu_count() == len(os.sched_getaffinity(0))


def test_table_defaults_match_the_dataclass_defaults() -> None:
    assert RetryConfig() == RetryConfig(**{name: key.default for name, key in RETRY.items()})
    source = SourceConfig(path=Path("x"))
    assert (source.glob, source.prune) == (SOURCE["glob"].default, SOURCE["prune"].default)


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", GOOD)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf/pipeline.yaml"), env=ENV)
    assert config.source.path == (tmp_path / "conf/pdfs").resolve()
    assert config.state == (tmp_path / "conf/.pipeline/state.db").resolve()
    assert path.exists()


def test_source_argument_overrides_source_path(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    text = GOOD.replace("source: {path: pdfs}", "source: {glob: '*.pdf', prune: false}")
    config = load_config(write(tmp_path, text), source=other, env=ENV)
    assert config.source == SourceConfig(path=other.resolve(), glob="*.pdf", prune=False)


def test_source_argument_must_be_an_existing_folder(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as caught:
        load_config(path, source=tmp_path / "nowhere", env=ENV)
    assert str(caught.value) == (
        f'{path}: --source: expected an existing folder, got "{tmp_path.resolve() / "nowhere"}"'
    )


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOY_KEY", "x")
    assert load_config(write(tmp_path, GOOD)).stages[1].params["key_env"] == "TOY_KEY"
    monkeypatch.delenv("TOY_KEY")
    with pytest.raises(ConfigError, match="TOY_KEY is not set"):
        load_config(write(tmp_path, GOOD))


def test_loading_writes_nothing_to_disk(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    before = sorted(tmp_path.rglob("*"))
    config = load_config(path, env=ENV)
    assert sorted(tmp_path.rglob("*")) == before
    assert not config.state.exists() and not config.state.parent.exists()


def test_null_with_and_timeout_mean_not_set(tmp_path: Path) -> None:
    text = GOOD.replace("timeout_s: 5", "timeout_s: null").replace(
        "with:\n      count: 2\n      out: out/echo.txt\n      key_env: TOY_KEY", "with:"
    )
    echo = load_config(write(tmp_path, text), env={}).stages[1]
    assert echo.timeout_s is None
    assert echo.params["out"] is None and echo.params["key_env"] is None


# --- errors ---------------------------------------------------------------------


def test_file_not_found_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: expected a readable config file")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "- source\n- stages\n")
    assert_says(err, tmp_path / "pipeline.yaml", 1, "", "a mapping with the keys source, state")
    assert str(err).endswith("got a list")


def test_empty_file_is_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "# nothing yet\n")
    assert str(err).endswith("got nothing")


def test_yaml_syntax_error_reports_the_line_of_the_mark(tmp_path: Path) -> None:
    text = GOOD.replace("    queue: 3", "    queue: [3")
    err = load_error(tmp_path, text)
    assert str(err).startswith(f"{tmp_path / 'pipeline.yaml'}:")
    assert err.line is not None and err.line >= line_of(text, "queue: [3")
    assert "expected valid YAML (" in str(err)


def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'state: "sk-secret-value\n')
    assert "sk-secret-value" not in str(err)
    assert err.line == 2


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        ("state:", "stat:", "stat", '(did you mean "state"?)'),
        ("{path: pdfs}", "{path: pdfs, globs: x}", "source.globs", '(did you mean "glob"?)'),
        ("    queue: 3", "    qeue: 3", "stages[1].qeue", '(did you mean "queue"?)'),
        ("{kind: async, size: 8}", "{kind: async, sise: 8}", "stages[1].pool.sise", "size"),
        ("{attempts: 2}", "{atempts: 2}", "stages[1].retry.atempts", '"attempts"'),
        ("      count: 2", "      cout: 2", "stages[1].with.cout", '(did you mean "count"?)'),
    ],
)
def test_unknown_key_says_what_is_allowed_and_the_closest_match(
    tmp_path: Path, old: str, new: str, key: str, hint: str
) -> None:
    text = GOOD.replace(old, new)
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", line_of(text, new.strip()), key, "one of ")
    assert hint in str(err)
    assert "got" not in str(err).split(key, 1)[1]  # the value is not shown


def test_unknown_stage_key_lists_every_stage_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("    queue: 3", "    qeue: 3"))
    assert str(err).endswith(
        "stages[1].qeue: expected one of name, uses, pool, queue, linger_ms, timeout_s, "
        'memory_mb, retry, with (did you mean "queue"?)'
    )


@pytest.mark.parametrize(
    ("old", "new", "key", "near"),
    [
        ("    uses: " + DOUBLE + "\n", "", "stages[0].uses", "- name: double"),
        ("source: {path: pdfs}", "source: {glob: '*.pdf'}", "source.path", "source:"),
        ("state: .pipeline/state.db\n", "", "state", "source:"),
    ],
)
def test_missing_required_key_is_reported_at_its_parent(
    tmp_path: Path, old: str, new: str, key: str, near: str
) -> None:
    text = GOOD.replace(old, new)
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", line_of(text, near), key, "(required)")
    assert str(err).endswith("got nothing")


def test_missing_stages_key(tmp_path: Path) -> None:
    text = "source: {path: pdfs}\nstate: s.db\n"
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 1, "stages", "a non-empty list of stages")


def test_missing_required_param(tmp_path: Path) -> None:
    text = GOOD.replace("uses: " + ECHO, "uses: openai.embed").replace(
        "pool: {kind: async, size: 8}", "pool: {kind: async, size: 2}"
    )
    text = text.replace("      count: 2\n      out: out/echo.txt\n      key_env: TOY_KEY", "")
    text = text.replace("    with:\n", "    with: {model: m}\n")
    err = load_error(tmp_path, text)
    assert_says(
        err, tmp_path / "pipeline.yaml", line_of(text, "with:"), "stages[1].with.url", "required"
    )


def test_unknown_uses_lists_the_known_kinds(tmp_path: Path) -> None:
    text = GOOD.replace("uses: " + DOUBLE, "uses: pdf.extrac")
    err = load_error(tmp_path, text)
    kinds = ", ".join(known_kinds())
    assert_says(
        err, tmp_path / "pipeline.yaml", 5, "stages[0].uses", f"a known stage kind ({kinds})"
    )
    assert '(did you mean "pdf.extract"?)' in str(err)
    assert str(err).endswith('got "pdf.extrac"')


def test_uses_path_to_a_missing_class_says_why(tmp_path: Path) -> None:
    text = GOOD.replace("uses: " + DOUBLE, f"uses: {Double.__module__}:Triple")
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 5, "stages[0].uses", "an importable stage class")
    assert "Triple" in str(err)


def test_uses_path_to_a_non_stage_is_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("uses: " + DOUBLE, "uses: pathlib:Path"))
    assert_says(err, tmp_path / "pipeline.yaml", 5, "stages[0].uses", "not a stage class")


def test_duplicate_stage_names(tmp_path: Path) -> None:
    text = GOOD.replace("name: echo", "name: double")
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 6, "stages[1].name", "no other stage has")
    assert str(err).endswith('got "double"')


def test_empty_stages_list(tmp_path: Path) -> None:
    err = load_error(tmp_path, "source: {path: pdfs}\nstate: s.db\nstages: []\n")
    assert_says(err, tmp_path / "pipeline.yaml", 3, "stages", "a non-empty list of stages")


def test_queue_below_one(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("queue: 3", "queue: 0"))
    assert_says(
        err,
        tmp_path / "pipeline.yaml",
        line_of(GOOD, "queue"),
        "stages[1].queue",
        "an integer >= 1",
    )
    assert str(err).endswith("got 0")


def test_booleans_do_not_pass_as_integers(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("queue: 3", "queue: true"))
    assert_says(
        err,
        tmp_path / "pipeline.yaml",
        line_of(GOOD, "queue"),
        "stages[1].queue",
        "an integer >= 1",
    )
    assert str(err).endswith("got True")


def test_pool_size_message_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "source: {path: pdfs}\nstate: s.db\nstages:\n"
        f"  - name: a\n    uses: {DOUBLE}\n  - name: b\n    uses: {DOUBLE}\n"
        f"  - name: c\n    uses: {ECHO}\n    with:\n      count: 1\n      label: x\n"
        "    pool:\n      size: many\n"
    )
    write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(Path("pipeline.yaml"), env={})
    assert str(caught.value) == (
        'pipeline.yaml:14: stages[2].pool.size: expected a positive integer or "auto", got "many"'
    )


@pytest.mark.parametrize("size", ["0", "-2", "1.5", "true", "'8'"])
def test_pool_size_must_be_a_positive_integer(tmp_path: Path, size: str) -> None:
    err = load_error(tmp_path, GOOD.replace("size: 8", f"size: {size}"))
    assert_says(
        err,
        tmp_path / "pipeline.yaml",
        line_of(GOOD, "pool:"),
        "stages[1].pool.size",
        "a positive integer",
    )


def test_pool_kind_must_be_one_the_stage_supports(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("kind: async", "kind: thread"))
    assert_says(
        err,
        tmp_path / "pipeline.yaml",
        line_of(GOOD, "pool:"),
        "stages[1].pool.kind",
        "one of async (",
    )
    assert str(err).endswith('got "thread"')


def test_missing_source_folder(tmp_path: Path) -> None:
    text = GOOD.replace("{path: pdfs}", "{path: nowhere}")
    err = load_error(tmp_path, text)
    missing = (tmp_path / "nowhere").resolve()
    assert str(err) == (
        f'{tmp_path / "pipeline.yaml"}:1: source.path: expected an existing folder, got "{missing}"'
    )


def test_api_key_env_naming_an_unset_variable_fails_naming_it(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD, env={"OTHER": "x"})
    assert str(err) == (
        f"{tmp_path / 'pipeline.yaml'}:{line_of(GOOD, 'key_env')}: stages[1].with.key_env: "
        "expected the name of a set environment variable, TOY_KEY is not set"
    )


def test_real_embed_api_key_env_message(tmp_path: Path) -> None:
    text = (
        "source: {path: pdfs}\nstate: s.db\nstages:\n  - name: embed\n    uses: openai.embed\n"
        "    with: {url: 'http://127.0.0.1:8000/v1', model: m, api_key_env: EMBEDDING_API_KEY}\n"
    )
    err = load_error(tmp_path, text, env={})
    assert str(err).endswith(
        "stages[0].with.api_key_env: expected the name of a set environment variable, "
        "EMBEDDING_API_KEY is not set"
    )


def test_a_secret_pasted_as_the_variable_name_is_not_echoed(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("key_env: TOY_KEY", "key_env: sk-proj-12345"))
    line = line_of(GOOD, "key_env")
    assert_says(err, tmp_path / "pipeline.yaml", line, "stages[1].with.key_env", "not the secret")
    assert "sk-proj-12345" not in str(err)


@pytest.mark.parametrize(
    ("where", "key", "line"),
    [
        ("      api_key: sk-secret\n", "stages[1].with.api_key", 16),
        ("    api_key: sk-secret\n", "stages[1].api_key", 16),
        ("api_key: sk-secret\n", "api_key", 16),
    ],
)
def test_a_literal_api_key_is_refused_without_echoing_it(
    tmp_path: Path, where: str, key: str, line: int
) -> None:
    err = load_error(tmp_path, GOOD + where)
    assert_says(err, tmp_path / "pipeline.yaml", line, key, "secrets come from the environment")
    assert "api_key_env" in str(err)
    assert "sk-secret" not in str(err)


def test_invalid_url_param(tmp_path: Path) -> None:
    text = GOOD.replace("      count: 2", "      url: ftp://files.example")
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 13, "stages[1].with.url", "an http or https URL")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", "an integer >= 1"), ("2.0", "an integer >= 1"), ("many", "an integer >= 1")],
)
def test_int_param_type_and_minimum(tmp_path: Path, value: str, expected: str) -> None:
    err = load_error(tmp_path, GOOD.replace("count: 2", f"count: {value}"))
    assert_says(err, tmp_path / "pipeline.yaml", 13, "stages[1].with.count", expected)


def test_choice_param(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("count: 2", "mode: medium"))
    assert_says(err, tmp_path / "pipeline.yaml", 13, "stages[1].with.mode", "one of fast, slow")


def test_stage_check_problem_is_reported_at_its_key(tmp_path: Path) -> None:
    text = GOOD.replace("      count: 2", "      mode: slow\n      loud: true")
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 13, "stages[1].with.mode", '"fast" when loud')


def test_memory_cap_needs_a_process_pool(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("timeout_s: 5", "memory_mb: 512"))
    line = line_of(GOOD, "timeout_s")
    assert_says(err, tmp_path / "pipeline.yaml", line, "stages[1].memory_mb", "on this async pool")


def test_retry_cap_below_base(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("{attempts: 2}", "{base_s: 5, cap_s: 1}"))
    assert_says(
        err,
        tmp_path / "pipeline.yaml",
        line_of(GOOD, "retry"),
        "stages[1].retry.cap_s",
        "a number >= base_s",
    )


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("    queue: 3", "    queue: 3\n    queue: 4"))
    first = line_of(GOOD, "queue")
    assert_says(
        err, tmp_path / "pipeline.yaml", first + 1, "stages[1].queue", f"(first at line {first})"
    )


def test_stage_that_is_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "source: {path: pdfs}\nstate: s.db\nstages:\n  - extract\n")
    assert_says(err, tmp_path / "pipeline.yaml", 4, "stages[0]", "a mapping")


# --- registry and the real stages -----------------------------------------------


def test_registry_finds_entry_points_and_module_paths() -> None:
    assert {"pdf.extract", "text.chunk", "openai.embed", "qdrant.upsert"} <= set(known_kinds())
    assert known_kinds() == sorted(known_kinds())
    assert resolve(DOUBLE) is Double
    assert issubclass(resolve("text.chunk"), StageBase)
    with pytest.raises(LookupError, match="known kinds: .*text.chunk"):
        resolve("text.chunks")
    with pytest.raises(LookupError, match="cannot import"):
        resolve("no_such_module_here:Stage")


EMBED_WITH = (
    '{url: "http://127.0.0.1:8000/v1", model: hash-384, api_key_env: EMBEDDING_API_KEY, batch: 64}'
)
REAL = """\
source: {path: examples/pdfs, glob: "**/*.pdf", prune: true}
state: .pipeline/state.db
shutdown_timeout_s: 30          # optional
stages:
  - name: extract
    uses: pdf.extract
    pool: {kind: process, size: auto}
    queue: 4
    timeout_s: 120
    memory_mb: 2048
    retry: {attempts: 5, base_s: 0.5, cap_s: 30}
  - name: chunk
    uses: text.chunk
    with: {size: 1200, overlap: 200}
  - name: embed
    uses: openai.embed
    pool: {kind: async, size: 64}
    with: EMBED_WITH
  - name: store
    uses: qdrant.upsert
    pool: {kind: thread, size: 1}
    with: {path: .pipeline/qdrant, collection: documents}
""".replace("EMBED_WITH", EMBED_WITH)


def test_the_documented_pipeline_yaml_loads_with_the_real_stages(tmp_path: Path) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    path = write(tmp_path, REAL)
    config = load_config(path, env={"EMBEDDING_API_KEY": "k"})
    extract, embed, store = config.stages
    [chunk] = extract.fused  # chunking runs in the extraction workers
    assert [s.uses for s in config.stages] == ["pdf.extract", "openai.embed", "qdrant.upsert"]
    assert extract.pool == PoolConfig("process", cpu_count())
    assert (extract.queue, extract.timeout_s, extract.memory_mb) == (4, 120.0, 2048)
    assert chunk.uses == "text.chunk" and chunk.pool.kind == "process"
    assert chunk.params["size"] == 1200 and chunk.params["overlap"] == 200
    assert embed.pool == PoolConfig("async", 64, adaptive=True) and embed.queue == 128
    assert embed.params["api_key_env"] == "EMBEDDING_API_KEY"
    assert store.params["path"] == (tmp_path / ".pipeline/qdrant").resolve()
    assert not (tmp_path / ".pipeline").exists()


def test_real_chunk_check_overlap_below_size(tmp_path: Path) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    text = REAL.replace("overlap: 200", "overlap: 1200")
    err = load_error(tmp_path, text, env={"EMBEDDING_API_KEY": "k"})
    assert_says(err, tmp_path / "pipeline.yaml", 14, "stages[1].with.overlap", "below size")


def test_a_fusible_stage_on_a_thread_pool_stays_its_own_stage(tmp_path: Path) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    path = write(
        tmp_path, REAL.replace("uses: text.chunk", "uses: text.chunk\n    pool: {kind: thread}")
    )
    config = load_config(path, env={"EMBEDDING_API_KEY": "k"})
    assert [s.uses for s in config.stages][:2] == ["pdf.extract", "text.chunk"]
    assert config.stages[0].fused == ()


def test_the_store_fuses_into_an_embedder_in_its_own_process_on_the_local_executor_only(
    tmp_path: Path,
) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    own = REAL.replace("pool: {kind: async, size: 64}", "pool: {kind: async, own_process: true}")
    config = load_config(write(tmp_path, own), env={"EMBEDDING_API_KEY": "k"})
    extract, embed = config.stages
    assert [f.uses for f in extract.fused] == ["text.chunk"]
    assert [f.uses for f in embed.fused] == ["qdrant.upsert"]  # stores from embed's process
    names = ["extract", "chunk", "embed", "store"]
    assert [s.name for s in declared(config.stages)] == names  # as the YAML lists them
    # On Ray the store stays on the driver; chunking still runs in extraction's workers.
    on_ray = fuse(config.stages, executor="ray")
    assert [s.name for s in on_ray] == ["extract", "embed", "store"]
    assert [f.name for f in on_ray[0].fused] == ["chunk"] and on_ray[1].fused == ()
    # An embedder in the engine's process keeps the store a stage of its own.
    in_engine = load_config(write(tmp_path, REAL), env={"EMBEDDING_API_KEY": "k"})
    assert [s.name for s in in_engine.stages] == ["extract", "embed", "store"]


def test_only_what_a_fused_stage_sets_and_its_host_decides_is_called_unused(
    tmp_path: Path,
) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    chunk = "uses: text.chunk\n    retry: {}\n    timeout_s: null\n    with: {size: 1200"
    quiet = REAL.replace("uses: text.chunk\n    with: {size: 1200", chunk)
    assert quiet != REAL
    config = load_config(write(tmp_path, quiet), env={"EMBEDDING_API_KEY": "k"})
    assert overridden(config.stages) == []  # an empty section, a null: nothing set
    # In a process pool's workers, the host's worker count and memory cap hold too.
    sized = REAL.replace(
        "uses: text.chunk\n", "uses: text.chunk\n    pool: {kind: process, size: 8}\n"
    )
    config = load_config(write(tmp_path, sized), env={"EMBEDDING_API_KEY": "k"})
    [line] = overridden(config.stages)
    assert line.startswith("chunk: pool.size set on it is not used: it runs inside the calls")


def validate(config: Path) -> str:
    """`pipeline validate` on `config`, in a wide terminal: what it printed."""
    shown = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EMBEDDING_API_KEY": "k", "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_validate_shows_where_each_fused_stage_runs(tmp_path: Path) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    own = REAL.replace("pool: {kind: async, size: 64}", "pool: {kind: async, own_process: true}")
    shown = validate(write(tmp_path, own))
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}
    assert "in extract's workers" in rows["chunk"]
    assert "in embed's process" in rows["store"]
    assert "not used" not in shown  # the store sets nothing its host decides

    # A fused stage's own timeout or batch would be silently ignored: validate says so.
    bounded = own.replace(
        "pool: {kind: thread, size: 1}\n    with: {path: .pipeline/qdrant,",
        "pool: {kind: thread, size: 1}\n    timeout_s: 5\n"
        "    with: {batch: 8, path: .pipeline/qdrant,",
    )
    assert bounded != own
    told = " ".join(validate(write(tmp_path, bounded)).split())
    assert "store: timeout_s, with.batch set on it are not used: it runs inside the calls" in told
    # And `pipeline run` says it before any work (here: an empty folder, nothing to do).
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-c", str(write(tmp_path, bounded))]
        + ["--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EMBEDDING_API_KEY": "k"},
    )
    assert run.returncode == 0, run.stderr
    warned = " ".join(run.stderr.split())
    assert "WARNING store: timeout_s, with.batch set on it are not used" in warned
    assert warned.index("not used") < warned.index("started")


def test_a_bare_off_in_yaml_means_off_for_a_choice_that_has_it(tmp_path: Path) -> None:
    (tmp_path / "examples/pdfs").mkdir(parents=True)
    text = REAL.replace("uses: pdf.extract", "uses: pdf.extract\n    with: {ocr: off}")
    config = load_config(write(tmp_path, text), env={"EMBEDDING_API_KEY": "k"})
    assert config.stages[0].params["ocr"] == "off"  # YAML 1.1 read `off` as false


def test_own_process_is_read_on_async_pools_and_refused_on_others(tmp_path: Path) -> None:
    text = f"""\
source: {{path: pdfs}}
state: .pipeline/state.db
stages:
  - {{name: double, uses: "{DOUBLE}", pool: {{kind: thread, size: 1, own_process: true}}}}
  - {{name: echo, uses: "{ECHO}", pool: {{kind: async, size: 8, own_process: true}}}}
"""
    err = load_error(tmp_path, text)
    assert_says(err, tmp_path / "pipeline.yaml", 4, "stages[0].pool.own_process", "thread pool")

    fixed = text.replace("size: 1, own_process: true", "size: 1")
    config = load_config(write(tmp_path, fixed), env=ENV)
    assert config.stages[1].pool == PoolConfig("async", 8, adaptive=True, own_process=True)
