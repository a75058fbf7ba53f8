"""The whole tool as a user runs it: real PDFs, a real HTTP embedding server on
127.0.0.1, the embedded Qdrant Edge store, the `pipeline` command in a subprocess.
Interruptions are real signals to a real process; we wait on the embedding
server's counters, the state database or the process, never on the clock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stages.embed_server import EmbeddingServer
from tests.fault_server import FaultServer
from tests.pdfs import CORPUS, MISSING
from tests.stores import collection

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=MISSING)

GOOD = [
    "latex-4pages.pdf",
    "libreoffice-writer-1p.pdf",
    "pdfa-crazyones.pdf",
    "manual-43p-qpdf.pdf",
    "google-docs-export.pdf",
    "encrypted-empty-userpw-aes256.pdf",
    "damaged-xref-recoverable.pdf",
]
BAD = {
    "broken-zero-bytes.pdf": "corrupt_pdf",
    "broken-attributeerror.pdf": "corrupt_pdf",
    "broken-not-pdf-html.pdf": "corrupt_pdf",
    "encrypted-password-aes256.pdf": "encrypted",
    "image-only-cmyk.pdf": "no_text",  # a photo: OCR finds nothing in it
}
TWINS = ["dup-hello-world-multilang.pdf", "multilang-ar-ru-zh.pdf"]  # byte-identical


@pytest.fixture(scope="module")
def embed_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as server:
        yield server


def make_project(
    folder: Path, url: str, files: list[str], *, embed: str = "", top: str = ""
) -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in files:
        shutil.copy(CORPUS / name, docs / name)
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
{top}
stages:
  - name: extract
    uses: pdf.extract
    pool: {{kind: process, size: 2}}
    timeout_s: 60
  - name: chunk
    uses: text.chunk
    with: {{size: 600, overlap: 100}}
  - name: embed
    uses: openai.embed
    pool: {{kind: async, size: 8}}
    retry: {{attempts: 3, base_s: 0.05, cap_s: 0.2}}
    with: {{url: "{url}", model: hash-384, batch: 16{embed}}}
  - name: store
    uses: qdrant.upsert
    with: {{path: qdrant, collection: docs, batch: 64}}
"""
    )
    return config


def pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(folder: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(folder / "state" / "state.db") as db:
        found = db.execute("SELECT path, status, reason FROM documents").fetchall()
    return {path: (status, reason) for path, status, reason in found}


def test_a_folder_of_real_pdfs_ends_indexed_skipped_or_failed_with_reasons(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    config = make_project(tmp_path, embed_server.url, [*GOOD, *BAD, *TWINS])
    run = pipeline("run", "-c", str(config), "--no-progress")
    assert run.returncode == 1, run.stderr  # finished, some failed
    state = rows(tmp_path)
    assert {p: s for p, (s, _) in state.items() if p in GOOD} == dict.fromkeys(GOOD, "indexed")
    assert {p: r for p, (_, r) in state.items() if p in BAD} == BAD
    # The walk is sorted, so the first twin is indexed and the second recorded as its duplicate.
    assert [state[twin] for twin in TWINS] == [("indexed", None), ("skipped", "duplicate")]
    assert "failed" in run.stderr and "no_text" in run.stderr  # the summary groups reasons

    failed = json.loads(pipeline("failed", "-c", str(config), "--json").stdout)
    assert sorted(f["path"] for f in failed) == sorted(BAD)
    assert all({"path", "stage", "error", "message", "attempts"} <= set(f) for f in failed)

    search = pipeline("search", "-c", str(config), "--json", "-k", "3", "qpdf linearization")
    hits = json.loads(search.stdout)
    assert hits and hits[0]["path"] == "manual-43p-qpdf.pdf"
    assert {"score", "path", "page", "text"} <= set(hits[0]) and hits[0]["page"] >= 1

    points = collection(tmp_path)
    assert {payload["path"] for _, payload in points.values()} == {*GOOD, TWINS[0]}

    retried = pipeline("retry", "-c", str(config), "--no-progress", "broken-zero-bytes.pdf")
    assert retried.returncode == 1, retried.stderr  # it fails again, alone
    attempts = {f["path"]: f["attempts"] for f in json.loads(
        pipeline("failed", "-c", str(config), "--json").stdout)}  # fmt: skip
    assert attempts["broken-zero-bytes.pdf"] == 2 and attempts["broken-attributeerror.pdf"] == 1

    assert pipeline("optimize", "-c", str(config)).returncode == 0
    again = pipeline("run", "-c", str(config), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert collection(tmp_path) == points  # nothing re-embedded, nothing doubled
    status = json.loads(pipeline("status", "-c", str(config), "--json").stdout)
    assert status["documents"] == {"indexed": len(GOOD) + 1, "failed": len(BAD), "skipped": 1}
    assert status["last_run"]["summary"]["unchanged"] == len(GOOD) + 1


def test_kill_9_mid_run_then_rerun_gives_the_collection_of_a_clean_run(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    files = [
        "manual-43p-qpdf.pdf",
        "latex-4pages.pdf",
        "pdfa-crazyones.pdf",
        "libreoffice-writer-1p.pdf",
        "google-docs-export.pdf",
        "multilang-ar-ru-zh.pdf",
    ]
    clean = make_project(tmp_path / "clean", embed_server.url, files)
    assert pipeline("run", "-c", str(clean), "--no-progress").returncode == 0

    with FaultServer() as server:
        killed = make_project(tmp_path / "killed", server.url, files)
        server.hang()  # embedding requests wait: the run is mid-flight when killed
        proc = start("run", "-c", str(killed), "--no-progress")
        assert server.wait_for_requests(1, timeout=60)
        proc.kill()
        proc.wait(timeout=30)
        server.release()
    assert any(status == "pending" for status, _ in rows(tmp_path / "killed").values())

    config_text = killed.read_text().replace(server.url, embed_server.url)
    killed.write_text(config_text)
    rerun = pipeline("run", "-c", str(killed), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert collection(tmp_path / "killed") == collection(tmp_path / "clean")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_drains_saves_and_the_next_run_resumes(
    tmp_path: Path, embed_server: EmbeddingServer, sig: signal.Signals, code: int
) -> None:
    files = ["manual-43p-qpdf.pdf", "latex-4pages.pdf", "pdfa-crazyones.pdf"]
    with FaultServer() as server:
        config = make_project(tmp_path, server.url, files, top="shutdown_timeout_s: 1")
        server.hang()  # the embedding API hangs: drain must still end, at the deadline
        proc = start("run", "-c", str(config), "--no-progress")
        assert server.wait_for_requests(1, timeout=60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        server.release()
    assert proc.returncode == code, err
    assert "next run resumes" in err
    config.write_text(config.read_text().replace(server.url, embed_server.url))
    resumed = pipeline("run", "-c", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert {status for status, _ in rows(tmp_path).values()} == {"indexed"}


def test_an_api_key_is_sent_but_never_shown(tmp_path: Path) -> None:
    secret = "sk-test-5f1c9e0d"
    with FaultServer() as server:
        config = make_project(
            tmp_path, server.url, ["latex-4pages.pdf"], embed=", api_key_env: TEST_EMBED_KEY"
        )
        server.reply_next(401)
        env = {**os.environ, "TEST_EMBED_KEY": secret}
        run = pipeline("-v", "run", "-c", str(config), "--no-progress", env=env)
        assert server.auth_headers and server.auth_headers[0] == f"Bearer {secret}"
    assert run.returncode == 3, run.stderr
    assert "TEST_EMBED_KEY" in run.stderr
    assert secret not in run.stdout + run.stderr
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    assert rows(tmp_path)["latex-4pages.pdf"][0] == "pending"  # not dead-lettered


def test_a_pdf_that_outruns_its_timeout_fails_alone(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    config = make_project(
        tmp_path, embed_server.url, ["slow-huge-content-stream.pdf", "latex-4pages.pdf"]
    )
    config.write_text(config.read_text().replace("timeout_s: 60", "timeout_s: 2"))
    run = pipeline("run", "-c", str(config), "--no-progress")
    assert run.returncode == 1, run.stderr
    assert rows(tmp_path) == {
        "slow-huge-content-stream.pdf": ("failed", "timeout"),
        "latex-4pages.pdf": ("indexed", None),
    }
    failed = json.loads(pipeline("failed", "-c", str(config), "--json").stdout)
    assert failed[0]["message"] == "timed out after 2 s"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_running_pipeline_shows_its_metrics_status_line_and_report(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    files = ["manual-43p-qpdf.pdf", "latex-4pages.pdf", "broken-zero-bytes.pdf"]
    port = free_port()
    report = tmp_path / "report.json"
    with FaultServer() as server:
        config = make_project(tmp_path, server.url, files)
        server.hang()  # hold the run mid-flight while we look at it
        proc = start(
            "run", "-c", str(config), "--no-progress", "--metrics-port", str(port),
            "--report", str(report),
        )  # fmt: skip
        assert server.wait_for_requests(1, timeout=60)
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        second = pipeline("run", "-c", str(config), "--no-progress")
        assert second.returncode == 3 and "in use by another run" in second.stderr
        assert proc.stderr is not None
        status = ""
        while "documents (" not in status:  # the plain status line, every 10 s
            status = proc.stderr.readline()
            assert status, "the run ended before printing a status line"
        server.release()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    for sample in (
        'pipeline_queue_depth{stage="embed"}',
        'pipeline_queue_capacity{stage="extract"} 4.0',
        'pipeline_workers{stage="embed"} 8.0',
        'pipeline_workers_busy{stage="embed"}',
        'pipeline_concurrency_limit{stage="embed"} 2.0',  # the adaptive limit's start
        'pipeline_concurrency_limit{stage="extract"} 2.0',  # a fixed pool: its size
        "pipeline_source_documents_total 3.0",
        'pipeline_items_total{outcome="ok",stage="extract"}',
        'pipeline_items_total{outcome="ok",stage="chunk"}',  # fused, counted as its own
        'pipeline_stage_seconds_bucket{le="0.005",stage="extract"}',
        'pipeline_stage_busy_seconds_total{stage="extract"}',
        "pipeline_dead_letters",
        "# TYPE pipeline_embedding_requests_total counter",
        "# TYPE pipeline_documents_total counter",
        "# TYPE pipeline_retries_total counter",
    ):
        assert sample in scrape, sample
    assert "embed[" in status and "busy, limit 2, queue" in status
    body = json.loads(report.read_text())
    assert body["indexed"] + body["failed"] + body["skipped"] == body["discovered"] == 3
    assert body["failed"] == 1 and body["chunks"] > 0 and body["pages"] > 0
    stages = [(s["name"], s["fused_into"]) for s in body["stages"]]
    assert stages == [("extract", None), ("chunk", "extract"), ("embed", None), ("store", None)]
    assert body["stages"][0]["fused"] == ["chunk"]  # chunking runs in the extraction workers
    assert body["stages"][1]["items_done"] > 0  # and is counted under its own name
    assert {"p50_batch_seconds", "queue_full_share", "utilisation"} <= set(body["stages"][0])
    assert body["hints"] and body["slowest_documents"]
    assert body["stages"][2]["concurrency"]["ceiling"] == 8


def test_a_second_sigint_stops_at_once(tmp_path: Path) -> None:
    with FaultServer() as server:
        config = make_project(
            tmp_path, server.url, ["latex-4pages.pdf"], top="shutdown_timeout_s: 600"
        )
        server.hang()
        proc = start("run", "-c", str(config), "--no-progress")
        assert server.wait_for_requests(1, timeout=60)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        while "stopping intake" not in (line := proc.stderr.readline()):
            assert line, "the run ended before it took the first SIGINT"
        proc.send_signal(signal.SIGINT)  # without this the drain would wait 600 s
        _, err = proc.communicate(timeout=60)
        server.release()
    assert proc.returncode == 130, err
    assert rows(tmp_path)["latex-4pages.pdf"][0] == "pending"
