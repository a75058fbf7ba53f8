"""A full or read-only disk under the state or the store: exit 3 with the path and the
reason, never a traceback or a signal; after space returns, the rerun ends as a clean
run would. Real filesystems: small tmpfs mounts (root only, as in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.corpus import generate
from stages.embed_server import EmbeddingServer
from tests.stores import collection
from tests.test_watch import Watching

DOCS = 600  # ~5,000 chunks: ~34 MB of Edge store


def _can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")


class Tmpfs:
    """A tmpfs of `size_mb` at `where`, unmounted at the end."""

    def __init__(self, where: Path, size_mb: int) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs")

    def _mount(self, *args: str) -> None:
        done = subprocess.run(["mount", *args, str(self.where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.where)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    generate(folder, docs=DOCS, pages=3)
    return folder


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as running:
        yield running


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[int], Tmpfs]]:
    """A tmpfs of the given size in MB at tmp_path/fs, unmounted after the test."""
    made: list[Tmpfs] = []

    def make(size_mb: int) -> Tmpfs:
        made.append(Tmpfs(tmp_path / "fs", size_mb))
        return made[-1]

    yield make
    for fs in made:
        fs.close()


def project(folder: Path, docs: Path, url: str, *, state: Path, store: Path, free: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: "{docs}"}}
state: "{state}"
min_free_mb: {free}
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}}}
  - {{name: chunk, uses: text.chunk}}
  - {{name: embed, uses: openai.embed, with: {{url: "{url}", model: hash-384}}}}
  - {{name: store, uses: qdrant.upsert, with: {{path: "{store}", collection: docs}}}}
"""
    )
    return config


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-c", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def points(store: Path) -> dict[str, tuple[list[float], dict[str, Any]]]:
    return collection(store.parent, store_folder=store.name)


def clean_run(
    tmp_path: Path, corpus: Path, url: str
) -> dict[str, tuple[list[float], dict[str, Any]]]:
    base = tmp_path / "clean"
    config = project(base, corpus, url, state=base / "state.db", store=base / "q", free=0)
    assert run(config).returncode == 0
    return points(base / "q")


def test_too_little_space_before_the_run_exits_3_before_anything_is_written(
    tmp_path: Path, corpus: Path, server: EmbeddingServer, mount: Callable[[int], Tmpfs]
) -> None:
    fs = mount(8)
    config = project(
        tmp_path, corpus, server.url, state=fs.where / "s/state.db", store=fs.where / "q", free=16
    )
    done = run(config)
    assert done.returncode == 3, done.stderr
    assert f"filesystem of {fs.where}" in done.stderr and "(min_free_mb: 16)" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(fs.where.iterdir()) == []  # not even the state database


def test_space_running_out_mid_run_stops_cleanly_and_the_rerun_matches_a_clean_run(
    tmp_path: Path, corpus: Path, server: EmbeddingServer, mount: Callable[[int], Tmpfs]
) -> None:
    fs = mount(40)
    store = fs.where / "q"
    config = project(
        tmp_path / "p", corpus, server.url, state=fs.where / "s/state.db", store=store, free=24
    )
    stopped = run(config)
    assert stopped.returncode == 3, stopped.stderr
    assert "disk almost full" in stopped.stderr and "min_free_mb: 24" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    fs.remount("size=256m")  # space returns
    resumed = run(config)
    assert resumed.returncode == 0, resumed.stderr
    assert points(store) == clean_run(tmp_path, corpus, server.url)


def test_a_full_state_database_stops_the_run_with_its_path_and_reason(
    tmp_path: Path, corpus: Path, server: EmbeddingServer, mount: Callable[[int], Tmpfs]
) -> None:
    fs = mount(1)  # room for the state of a few hundred documents
    state = fs.where / "state.db"
    store = tmp_path / "q"
    config = project(tmp_path / "p", corpus, server.url, state=state, store=store, free=0)
    full = run(config)
    assert full.returncode == 3, full.stderr
    assert f"cannot write the run state at {state}" in full.stderr
    assert "full" in full.stderr and "Traceback" not in full.stderr
    fs.remount("size=64m")
    resumed = run(config)
    assert resumed.returncode == 0, resumed.stderr
    assert points(store) == clean_run(tmp_path, corpus, server.url)


def test_a_read_only_filesystem_stops_the_run_with_its_path_and_reason(
    tmp_path: Path, corpus: Path, server: EmbeddingServer, mount: Callable[[int], Tmpfs]
) -> None:
    fs = mount(128)
    store = fs.where / "q"
    config = project(
        tmp_path / "p", corpus, server.url, state=fs.where / "state.db", store=store, free=0
    )
    assert run(config).returncode == 0
    (corpus / "doc-00000.pdf").touch()  # a change for the next run to write
    fs.remount("ro")
    refused = run(config)
    assert refused.returncode == 3, refused.stderr
    assert str(fs.where) in refused.stderr and "read-only" in refused.stderr.lower()
    assert "Traceback" not in refused.stderr
    fs.remount("rw")
    assert run(config).returncode == 0
    assert points(store) == clean_run(tmp_path, corpus, server.url)


def test_a_watcher_pauses_on_a_full_disk_and_resumes_when_space_returns(
    tmp_path: Path, corpus: Path, server: EmbeddingServer, mount: Callable[[int], Tmpfs]
) -> None:
    fs = mount(40)
    store = fs.where / "q"
    config = project(
        tmp_path / "p", corpus, server.url, state=fs.where / "s/state.db", store=store, free=24
    )
    config.write_text(config.read_text() + "watch: {settle_s: 0, rescan_s: 600}\n")
    watch = Watching("-c", str(config))
    try:
        watch.wait_for("paused: waiting for free space")
        fs.remount("size=256m")
        watch.wait_for("free space is back; resuming")
        watch.wait_for("watching ")  # caught up
    finally:
        code = watch.stop()
    assert code == 143
    assert "Traceback" not in "".join(watch.log)
    assert points(store) == clean_run(tmp_path, corpus, server.url)
