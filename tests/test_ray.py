"""The Ray executor: the same pipeline.yaml on a local Ray, as a user runs it.

Each `pipeline run --executor ray` starts its own Ray instance (2 CPUs, a small
object store, no dashboard, loopback only) and stops it. Results are compared with
the local executor's on the same corpus. Every test has a hard timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# As the executor does before importing Ray for a local instance: loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray")

from stages.embed_server import EmbeddingServer  # noqa: E402
from tests.fault_server import FaultServer  # noqa: E402
from tests.stores import collection as points  # noqa: E402

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
PDFS = REPO / "examples" / "pdfs"
FILES = ["pdfa-crazyones.pdf", "google-docs-export.pdf", "ocr-layer-scanned-book-6p.pdf"]
RAY = "ray: {num_cpus: 2, object_store_mb: 96}"


@pytest.fixture(scope="module")
def embed_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as server:
        yield server


def project(folder: Path, url: str, *, files: list[str] = FILES, top: str = "") -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in files:
        shutil.copy(PDFS / name, docs / name)
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
{RAY}
{top}
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}, timeout_s: 60}}
  - {{name: chunk, uses: text.chunk, with: {{size: 600, overlap: 100}}}}
  - name: embed
    uses: openai.embed
    pool: {{kind: async, size: 8}}
    retry: {{attempts: 4, base_s: 0.05, cap_s: 0.2}}
    with: {{url: "{url}", model: hash-384, batch: 16}}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=200
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


def status(config: Path) -> dict[str, int]:
    documents: dict[str, int] = json.loads(pipeline("status", "-c", str(config), "--json").stdout)[
        "documents"
    ]
    return documents


def ray_processes() -> set[int]:
    """Ray's own processes on this machine (raylet, gcs_server, workers)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if re.search(r"ray::|raylet|gcs_server|ray/_private|default_worker\.py", args):
            found.add(int(pid))
    return found


def test_both_executors_give_the_same_collection_and_a_rerun_embeds_nothing(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    local = project(tmp_path / "local", embed_server.url)
    assert pipeline("run", "-c", str(local), "--no-progress").returncode == 0
    on_ray = project(tmp_path / "ray", embed_server.url)
    # As the default pipeline.yaml has it. Locally the store would run in the
    # embedder's process (pipeline.fusion); `--executor ray` keeps it on the driver.
    text = on_ray.read_text()
    on_ray.write_text(
        text.replace("{kind: async, size: 8}", "{kind: async, size: 8, own_process: true}")
    )
    report = tmp_path / "report.json"
    run = pipeline(
        "run", "-c", str(on_ray), "--no-progress", "--executor", "ray", "--report", str(report)
    )
    assert run.returncode == 0, run.stderr

    assert points(tmp_path / "ray") == points(tmp_path / "local")
    assert status(on_ray) == status(local) == {"indexed": len(FILES)}
    stages = {s["name"]: s for s in json.loads(report.read_text())["stages"]}
    assert sum(stages["extract"]["nodes"].values()) == len(FILES)  # per-node counts
    assert stages["store"]["nodes"] == {}  # the store ran on the driver

    requests = embed_server.requests
    again = pipeline("run", "-c", str(on_ray), "--no-progress", "--executor", "ray")
    assert again.returncode == 0, again.stderr
    assert embed_server.requests == requests  # nothing embedded twice
    assert points(tmp_path / "ray") == points(tmp_path / "local")


def test_bad_documents_fail_alone_and_transient_errors_are_retried(tmp_path: Path) -> None:
    config = project(tmp_path, "http://unused", top="executor: ray")
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"<html>not a pdf</html>")
    with FaultServer() as server:
        config.write_text(config.read_text().replace("http://unused", server.url))
        server.reply_next(429, headers={"Retry-After": "0"})
        server.reply_next(503)
        server.reject_input("Beautiful is better than ugly")  # a 400 for one chunk
        run = pipeline("run", "-c", str(config), "--no-progress")
        assert server.requests >= 4
    assert run.returncode == 1, run.stderr
    assert rows(tmp_path) == {
        "pdfa-crazyones.pdf": ("indexed", None),
        "ocr-layer-scanned-book-6p.pdf": ("indexed", None),
        "google-docs-export.pdf": ("failed", "http_400"),
        "broken.pdf": ("failed", "corrupt_pdf"),
    }
    failed = json.loads(pipeline("failed", "-c", str(config), "--json").stdout)
    assert sorted((f["path"], f["stage"]) for f in failed) == [
        ("broken.pdf", "extract"),
        ("google-docs-export.pdf", "embed"),
    ]


def test_sigterm_drains_and_the_next_run_ends_as_a_clean_run(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    clean = project(tmp_path / "clean", embed_server.url)
    assert pipeline("run", "-c", str(clean), "--no-progress").returncode == 0
    with FaultServer() as server:
        config = project(tmp_path / "run", server.url, top="executor: ray\nshutdown_timeout_s: 2")
        server.hang()
        proc = start("run", "-c", str(config), "--no-progress")
        assert server.wait_for_requests(1, timeout=120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        server.release()
    assert proc.returncode == 143, err
    assert "next run resumes" in err
    config.write_text(config.read_text().replace(server.url, embed_server.url))
    resumed = pipeline("run", "-c", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert points(tmp_path / "run") == points(tmp_path / "clean")


def test_kill_9_of_the_driver_loses_nothing_and_leaves_no_ray_process(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    clean = project(tmp_path / "clean", embed_server.url)
    assert pipeline("run", "-c", str(clean), "--no-progress").returncode == 0
    before = ray_processes()
    with FaultServer() as server:
        config = project(tmp_path / "run", server.url, top="executor: ray")
        server.hang()
        proc = start("run", "-c", str(config), "--no-progress")
        assert server.wait_for_requests(1, timeout=120)
        started = ray_processes() - before
        assert started  # this run's Ray is up
        proc.kill()
        proc.wait(timeout=30)
        server.release()
    deadline = time.monotonic() + 30
    while started & ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)  # polling the process table: there is nothing to wait on
    assert not started & ray_processes()

    config.write_text(config.read_text().replace(server.url, embed_server.url))
    rerun = pipeline("run", "-c", str(config), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert points(tmp_path / "run") == points(tmp_path / "clean")


def test_ray_listens_and_connects_on_loopback_only() -> None:
    from pipeline.config import RayConfig
    from pipeline.ray_executor import RayExecutor

    before = ray_processes()
    executor = RayExecutor(RayConfig(num_cpus=2, object_store_mb=96))
    try:
        ours = ray_processes() - before
        sockets = subprocess.run(
            ["ss", "-tanpH"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    finally:
        executor.close()
    mine = [s for s in sockets if any(f"pid={pid}," in s for pid in ours | {os.getpid()})]
    assert any(line.startswith("LISTEN") for line in mine)
    for line in mine:
        state, _, _, local, peer = line.split()[:5]
        assert _loopback(local), line  # listening or connected, only on loopback
        assert _loopback(peer) or (state == "LISTEN" and peer.endswith(":*")), line


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


def test_validate_without_ray_installed_exits_2_saying_how_to_install(tmp_path: Path) -> None:
    config = project(tmp_path, "http://127.0.0.1:9/v1", top="executor: ray")
    blocked = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pipeline.cli import main\n"
        f"sys.exit(main(['validate', '-c', {str(config)!r}]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert "executor" in run.stderr and "pip install '.[ray]'" in run.stderr


def _metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise LookupError(name)


def test_a_hung_api_bounds_what_the_source_hands_on(tmp_path: Path) -> None:
    from bench.corpus import generate

    corpus = 400
    with FaultServer() as server:
        config = project(tmp_path, server.url, files=[], top="executor: ray")
        generate(tmp_path / "docs", docs=corpus, pages=1)
        server.hang()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = start("run", "-c", str(config), "--no-progress", "--metrics-port", str(port))
        try:
            assert server.wait_for_requests(1, timeout=120)
            assert proc.stderr is not None
            handed = []
            for _ in range(2):  # two status lines, 10 s apart: time passes, nothing enters
                while "documents (" not in proc.stderr.readline():
                    pass
                handed.append(_metric(port, "pipeline_source_documents_total"))
        finally:
            proc.kill()
            proc.wait(timeout=30)
            server.release()
    assert handed[0] == handed[1] < corpus / 4


def test_two_nodes_share_extraction_and_a_lost_node_loses_nothing(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    from ray.cluster_utils import Cluster

    files = [name.name for name in sorted(PDFS.glob("*.pdf"))]
    clean = project(tmp_path / "clean", embed_server.url, files=files)
    assert pipeline("run", "-c", str(clean), "--no-progress").returncode == 0

    node = {"num_cpus": 1, "object_store_memory": 96 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        worker = cluster.add_node(**node)
        report = tmp_path / "report.json"
        both = project(tmp_path / "both", embed_server.url, files=files)
        run = pipeline(
            "run", "-c", str(both), "--no-progress", "--ray-address", cluster.address,
            "--report", str(report),
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        extract = json.loads(report.read_text())["stages"][0]
        assert len(extract["nodes"]) == 2, extract["nodes"]  # both nodes extracted
        assert points(tmp_path / "both") == points(tmp_path / "clean")

        with FaultServer() as server:
            lost = project(tmp_path / "lost", server.url, files=files)
            server.hang()  # extraction runs ahead while embedding waits
            proc = start("run", "-c", str(lost), "--no-progress", "--ray-address", cluster.address)
            assert server.wait_for_requests(1, timeout=120)
            cluster.remove_node(worker)
            server.release()
            _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        lost.write_text(lost.read_text().replace(server.url, embed_server.url))
        assert pipeline("run", "-c", str(lost), "--no-progress").returncode == 0
        assert points(tmp_path / "lost") == points(tmp_path / "clean")
    finally:
        cluster.shutdown()


def test_a_remote_cluster_refuses_a_driver_path_on_a_stage_its_nodes_run(tmp_path: Path) -> None:
    from tests.toy_stages import Logged

    config = project(tmp_path, "http://127.0.0.1:9/v1", top="executor: ray")
    stage = f"{Logged.__module__}:Logged"
    text = config.read_text().replace(
        "  - name: embed",
        f"  - {{name: double, uses: '{stage}', pool: {{kind: process}}, with: {{log: out}}}}\n"
        "  - name: embed",
    )
    config.write_text(text)
    assert pipeline("validate", "-c", str(config)).returncode == 0  # a local Ray: one machine
    config.write_text(text.replace(RAY, "ray: {address: 'ray://head.example:10001'}"))
    run = pipeline("validate", "-c", str(config))
    assert run.returncode == 2, run.stderr
    assert "stages[2].with.log" in run.stderr and "pool kind thread" in run.stderr


def test_the_local_executor_never_imports_ray(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    config = project(tmp_path, embed_server.url)
    script = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"code = main(['run', '-c', {str(config)!r}, '--no-progress'])\n"
        "sys.exit(code or (9 if 'ray' in sys.modules else 0))\n"
    )
    command = [sys.executable, "-c", script]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_hung_document_fails_at_its_timeout_and_only_it(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    from tests.toy_stages import Pages

    config = project(tmp_path, embed_server.url, top="executor: ray")
    (tmp_path / "docs" / "hang.pdf").write_bytes(b"%PDF-1.4 never read")
    stage = f"{Pages.__module__}:Pages"
    config.write_text(
        config.read_text().replace(
            "uses: pdf.extract, pool: {kind: process, size: 2}, timeout_s: 60",
            f"uses: '{stage}', pool: {{kind: process, size: 2}}, timeout_s: 1",
        )
    )
    run = pipeline("run", "-c", str(config), "--no-progress")
    assert run.returncode == 1, run.stderr
    assert rows(tmp_path) == {
        **{name: ("indexed", None) for name in FILES},
        "hang.pdf": ("failed", "timeout"),
    }


def test_an_async_stage_s_end_of_run_note_comes_back_from_its_ray_actor(
    tmp_path: Path, embed_server: EmbeddingServer
) -> None:
    config = project(tmp_path, embed_server.url, top="executor: ray")
    config.write_text(config.read_text().replace("batch: 16}", "batch: 16, max_input_tokens: 20}"))
    run = pipeline("run", "-c", str(config), "--no-progress")
    assert run.returncode == 0, run.stderr
    said = " ".join(run.stderr.split())
    assert "note: embed:" in said and "input window of 20 tokens" in said
