"""Command-line mistakes: one line, exit 2, nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "pipeline.yaml", tmp_path / "pipeline.yaml")
    (tmp_path / "examples" / "pdfs").mkdir(parents=True)
    return tmp_path / "pipeline.yaml"


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--report", "/no/such/folder/report.json"], "command line: --report: expected a file"),
        (["--metrics-port", "70000"], "command line: --metrics-port: expected a port from 1"),
    ],
)
def test_a_bad_flag_exits_2_before_any_work(project: Path, flags: list[str], says: str) -> None:
    run = pipeline("run", "-c", str(project), "--no-progress", *flags)
    assert run.returncode == 2
    assert run.stderr.startswith(says) and "Traceback" not in run.stderr
    assert not (project.parent / ".pipeline").exists()


def test_a_broken_config_exits_2_naming_file_line_and_key(project: Path) -> None:
    project.write_text(project.read_text().replace("size: 64,", 'size: "many",'))
    run = pipeline("validate", "-c", str(project))
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f'{project}:22: stages[2].pool.size: expected a positive integer or "auto", got "many"'
    )


def test_a_url_carrying_credentials_is_refused_without_echoing_them(project: Path) -> None:
    project.write_text(
        project.read_text().replace(
            "http://127.0.0.1:8000/v1", "https://me:sk-secret9@example.com/v1"
        )
    )
    run = pipeline("run", "-c", str(project), "--no-progress")
    assert run.returncode == 2
    assert "stages[2].with.url" in run.stderr and "sk-secret9" not in run.stderr


def test_json_logs_are_one_object_per_line(project: Path) -> None:
    import json

    run = pipeline("--log-format", "json", "run", "-c", str(project), "--no-progress")
    assert run.returncode == 0, run.stderr
    logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert any(e["level"] == "info" and "started" in e["message"] for e in logged)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in logged)


async def test_search_waits_for_a_store_another_process_holds() -> None:
    """`pipeline search` while a watcher's pass holds an embedded store: it waits
    (`--wait`) instead of failing at once, and gives up after the wait."""
    from pipeline.cli import _open_waiting
    from pipeline.errors import InUseError
    from pipeline.stage import Item, Stage

    class Busy(Stage):
        def __init__(self, busy_for: int) -> None:
            super().__init__({}, name="store")
            self.busy_for = busy_for
            self.tries = 0

        def open(self) -> None:
            self.tries += 1
            if self.tries <= self.busy_for:
                raise InUseError("store in use by another run: q")

        def process(self, items: list[Item]) -> list[Item]:
            return items

    freed = Busy(busy_for=2)
    await _open_waiting(freed, 10.0)
    assert freed.tries == 3
    with pytest.raises(InUseError):
        await _open_waiting(Busy(busy_for=10**6), 0.3)
