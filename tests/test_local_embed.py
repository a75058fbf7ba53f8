"""Local models, in-process (`local.embed`) and served (`serve-embeddings --model`),
with the all-MiniLM-L6-v2 that the `local` extra installs: no network anywhere.

The pipeline runs as a user runs it (the `pipeline` command in a subprocess) over
PDFs shipped in the repo; vectors are compared with sentence-transformers' own
`encode` of the same texts and between the in-process and served models.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from stages import local_model  # noqa: E402
from stages.embed_server import EmbeddingServer  # noqa: E402
from stages.served_model import Batcher, SentenceModel  # noqa: E402
from tests.stores import collection as points  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PDFS = REPO / "examples" / "pdfs"
SMALL = ["pdfa-crazyones.pdf", "google-docs-export.pdf", "ocr-layer-scanned-book-6p.pdf"]
MODEL = "all-MiniLM-L6-v2"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model() -> Any:
    return local_model.load(MODEL, device="cpu", threads=2)


@pytest.fixture(scope="module")
def served() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(model=SentenceModel(MODEL, device="cpu")) as server:
        yield server
    server.model.close()


def project(folder: Path, embed: str, *, size: int = 800, files: list[str] = SMALL) -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in files:
        shutil.copy(PDFS / name, docs / name)
    config = folder / "pipeline.yaml"
    config.write_text(
        f"""
source: {{path: docs}}
state: state/state.db
stages:
  - {{name: extract, uses: pdf.extract, pool: {{kind: process, size: 2}}}}
  - {{name: chunk, uses: text.chunk, with: {{size: {size}, overlap: 100}}}}
  - {embed}
  - {{name: store, uses: qdrant.upsert, with: {{path: qdrant, collection: docs}}}}
"""
    )
    return config


IN_PROCESS = f"{{name: embed, uses: local.embed, with: {{model: {MODEL}, batch: 16}}}}"


def served_stage(url: str, model: str = MODEL) -> str:
    return f'{{name: embed, uses: openai.embed, with: {{url: "{url}", model: {model}}}}}'


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=OFFLINE,
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small corpus indexed in-process, once for the module."""
    folder = tmp_path_factory.mktemp("local")
    run = pipeline("run", "-c", str(project(folder, IN_PROCESS)), "--no-progress")
    assert run.returncode == 0, run.stderr
    return folder


def test_the_pipeline_vectors_are_sentence_transformers_own(indexed: Path, model: Any) -> None:
    stored = points(indexed)
    texts = [payload["text"] for _, payload in stored.values()]
    ours = np.array([vector for vector, _ in stored.values()], dtype=np.float32)

    theirs = model.encode(texts, batch_size=16, convert_to_numpy=True)

    assert len(texts) > 10
    assert np.allclose(ours, theirs, atol=1e-5)
    assert {p["path"] for _, p in stored.values()} == set(SMALL)


def test_served_and_in_process_models_give_the_same_vectors(
    tmp_path: Path, indexed: Path, served: EmbeddingServer
) -> None:
    run = pipeline("run", "-c", str(project(tmp_path, served_stage(served.url))), "--no-progress")
    assert run.returncode == 0, run.stderr

    local, remote = points(indexed), points(tmp_path)
    assert local.keys() == remote.keys()
    ids = sorted(local)
    a = np.array([local[i][0] for i in ids])
    b = np.array([remote[i][0] for i in ids])
    assert cosines(a, b).min() >= 0.999
    assert [local[i][1] for i in ids] == [remote[i][1] for i in ids]


def test_the_served_model_batches_and_answers_in_float_and_base64(
    served: EmbeddingServer, model: Any
) -> None:
    texts = ["the siege of the city", "decrypt a PDF", "beautiful is better than ugly"]
    replies: dict[str, list[list[float]]] = {}
    for encoding in ("float", "base64"):
        reply = httpx.post(
            f"{served.url}/embeddings",
            json={
                "model": f"sentence-transformers/{MODEL}",
                "input": texts,
                "encoding_format": encoding,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        rows = [d["embedding"] for d in reply.json()["data"]]
        if encoding == "base64":
            import base64

            rows = [np.frombuffer(base64.b64decode(r), dtype="<f4").tolist() for r in rows]
        replies[encoding] = rows
    assert np.allclose(replies["float"], replies["base64"])
    assert cosines(np.array(replies["float"]), model.encode(texts)).min() >= 0.999

    listed = httpx.get(f"{served.url}/models").json()["data"]
    assert [(m["id"], m["max_input_tokens"]) for m in listed] == [(MODEL, 256)]
    wrong = httpx.post(f"{served.url}/embeddings", json={"model": "hash-384", "input": ["x"]})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"


def test_requests_that_arrive_while_the_model_is_busy_share_one_pass() -> None:
    gate = threading.Event()
    passes: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        passes.append(texts)
        if len(passes) == 1:
            gate.wait(10)  # the model is busy with the first request
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    batcher = Batcher(encode)
    results: dict[str, np.ndarray] = {}

    def ask(text: str) -> None:
        results[text] = batcher.embed([text, text + "!"])

    def until(predicate: Any) -> None:
        with batcher.changed:
            assert batcher.changed.wait_for(predicate, timeout=10)

    threads = [threading.Thread(target=ask, args=(t,)) for t in ("a", "bb", "ccc", "dddd")]
    threads[0].start()
    until(lambda: batcher.running == 1)
    for thread in threads[1:]:
        thread.start()
    until(lambda: batcher.waiting == 3)
    gate.set()
    for thread in threads:
        thread.join(10)
    batcher.close()

    assert [len(p) for p in passes] == [2, 6]  # the three waiting requests in one pass
    assert {t: r[:, 0].tolist() for t, r in results.items()} == {
        t: [len(t), len(t) + 1] for t in ("a", "bb", "ccc", "dddd")
    }


def test_long_chunks_are_cut_as_the_model_cuts_them_and_the_run_says_so(
    tmp_path: Path, model: Any
) -> None:
    files = ["ocr-layer-scanned-book-6p.pdf"]
    run = pipeline(
        "run", "-c", str(project(tmp_path, IN_PROCESS, size=3000, files=files)), "--no-progress"
    )
    assert run.returncode == 0, run.stderr
    stored = points(tmp_path)
    texts = [payload["text"] for _, payload in stored.values()]
    tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    cut = sum(n > 256 for n in tokens)
    assert cut > 0
    ours = np.array([vector for vector, _ in stored.values()], dtype=np.float32)
    assert np.allclose(ours, model.encode(texts, batch_size=16), atol=1e-5)  # cut, not refused
    said = " ".join(run.stderr.split())
    assert f"{cut} of {len(texts)} chunks" in said and "input window of 256 tokens" in said
    assert "Chunks of at most" in said


def test_the_default_chunk_size_fits_the_default_model(model: Any) -> None:
    from stages.chunk import Chunk, chunk_pages
    from stages.pdf_text import read_pypdf

    size, overlap = Chunk.PARAMS["size"].default, Chunk.PARAMS["overlap"].default
    english = ["manual-43p-qpdf.pdf", "us-gov-federal-register-3col-15p.pdf"]
    texts = [
        text
        for name in english
        for _, text in chunk_pages(
            read_pypdf((PDFS / name).read_bytes()), size=size, overlap=overlap
        )
    ]
    tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    assert sum(n > 256 for n in tokens) <= 0.1 * len(texts)


def test_a_model_that_is_not_here_fails_validation_saying_where_it_looked(
    tmp_path: Path,
) -> None:
    embed = "{name: embed, uses: local.embed, with: {model: no-such-minilm}}"
    run = pipeline("validate", "-c", str(project(tmp_path, embed)))

    assert run.returncode == 2
    assert "stages[2].with.model" in run.stderr and "Hugging Face cache" in run.stderr
    assert "huggingface-cli download sentence-transformers/no-such-minilm" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_model_folder_resolves_against_the_config(tmp_path: Path) -> None:
    folder = local_model.model_folder(MODEL)
    shutil.copytree(folder, tmp_path / "models" / "mini")
    embed = "{name: embed, uses: local.embed, with: {model: models/mini}}"
    run = pipeline("validate", "-c", str(project(tmp_path, embed)))

    assert run.returncode == 0, run.stderr
    assert "from folder" in " ".join(run.stdout.split())


def test_search_embeds_with_the_collection_model_and_refuses_another(
    indexed: Path, served: EmbeddingServer
) -> None:
    config = indexed / "pipeline.yaml"
    found = pipeline("search", "-c", str(config), "--json", "what happened during the siege")
    assert found.returncode == 0, found.stderr
    assert '"path": "ocr-layer-scanned-book-6p.pdf"' in found.stdout.split("}")[0]

    with EmbeddingServer() as hashing:  # a pipeline switched to another model
        other = config.parent / "other.yaml"
        other.write_text(
            config.read_text().replace(IN_PROCESS, served_stage(hashing.url, "hash-384"))
        )
        for command in ("search", "run"):
            args = ["the siege"] if command == "search" else ["--no-progress"]
            refused = pipeline(command, "-c", str(other), *args)
            assert refused.returncode == 2, refused.stderr
            said = " ".join(refused.stderr.split())
            assert "stages[2].with.model" in said and f"'{MODEL}'" in said and "hash-384" in said
        assert hashing.requests == 0


def test_an_empty_batch_and_an_empty_query_list_embed_nothing() -> None:
    from stages.local_embed import LocalEmbed

    stage = LocalEmbed({"model": MODEL, "device": "cpu"}, name="embed")
    stage.open()
    try:
        assert stage.process([]) == [] and stage.embed_texts([]) == []
    finally:
        stage.close()
