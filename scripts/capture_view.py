"""Capture the live view of a real run as docs/live-view.svg, for the README.

Runs the default pipeline over examples/pdfs into a temporary folder, with the
builtin embedding server answering after 300 ms so the queues have something
to show, and records the frame drawn once half the documents are finished.
Usage: .venv/bin/python scripts/capture_view.py
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.state import open_state
from pipeline.terminal import render_frame
from stages.embed_server import EmbeddingServer

REPO = Path(__file__).resolve().parents[1]


async def capture(workdir: Path, url: str) -> Console:
    shutil.copytree(REPO / "examples" / "pdfs", workdir / "examples" / "pdfs")
    text = (REPO / "pipeline.yaml").read_text().replace("http://127.0.0.1:8000/v1", url)
    text = text.replace("model: all-MiniLM-L6-v2", "model: hash-384")  # the builtin server's
    text = text.replace("batch: 64}", "batch: 8}").replace("size: 64,", "size: 4,")
    assert "size: 4," in text and "hash-384" in text, "pipeline.yaml changed: update this script"
    (workdir / "pipeline.yaml").write_text(text)
    config = load_config(workdir / "pipeline.yaml")
    state = open_state(config.state, exclusive=True)
    runner = Runner(config, state=state)
    started = time.monotonic()
    task = asyncio.create_task(runner.run())
    await runner.wait_until(lambda r: r.outcome.chunks >= 120)
    console = Console(record=True, width=110, file=io.StringIO())
    console.print(render_frame(runner.outcome, runner.views(), elapsed=time.monotonic() - started))
    await task
    state.close()
    return console


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, EmbeddingServer(latency_s=0.3) as server:
        console = asyncio.run(capture(Path(tmp), server.url))
    out = REPO / "docs" / "live-view.svg"
    console.save_svg(str(out), title="pipeline run")
    sys.stdout.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
