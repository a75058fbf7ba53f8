"""Reading pages that have no text layer: render with PDFium, recognise with RapidOCR.

RapidOCR (`rapidocr-onnxruntime`, the `ocr` extra) ships its PP-OCRv4 detection,
direction and recognition models inside the wheel, so nothing is downloaded at
run time and no system package is needed; its models read Latin and Chinese
scripts. It runs inside the extraction worker, where the document is already
open: no images cross between processes, and the stage's `timeout_s` and
`memory_mb` still kill a runaway page with its document alone.

- **Resolution suited to the page.** A page is rendered so its long side is
  about 2,000 pixels (what the detector works at), whatever its size in points:
  a business card scanned at 2,400 dpi and an A4 fax at 150 dpi both arrive at a
  readable scale, neither upscaled past 4x nor rendered at poster size.
- **The right way up.** Lines upside down are turned by RapidOCR's direction
  model. A page rotated by 90 or 270 degrees shows as boxes taller than wide;
  then both quarter turns are read and the one recognised with more confidence wins.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where used: the engine's process loads this module
    import numpy as np  # to validate the config, and never reads a page
    import numpy.typing as npt

__all__ = ["OCR_EXTRA_HINT", "PageReader", "ocr_available"]

logger = logging.getLogger(__name__)

OCR_EXTRA_HINT = "install the OCR extra to read scans: pip install 'pdf-pipeline[ocr]'"
TARGET_SIDE_PX = 2000
MAX_SCALE = 4.0
MIN_SCALE = 0.25


def ocr_available() -> bool:
    """Whether the OCR extra is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


class PageReader:
    """One worker's OCR engine, built on first use (its models take ~0.2 s to load)."""

    def __init__(self) -> None:
        self._engine: Any = None

    def read(self, page: Any) -> str:
        """The text of a pypdfium2 page, recognised from its rendered image."""
        import numpy as np

        image = render(page)
        text, confidence, upright = self._recognise(image)
        if not upright:
            turned = [self._recognise(np.ascontiguousarray(np.rot90(image, k))) for k in (1, 3)]
            best = max(turned, key=lambda found: found[1])
            if best[1] > confidence:
                text = best[0]
        return text

    def _recognise(self, image: npt.NDArray[np.uint8]) -> tuple[str, float, bool]:
        """(text, confidence-weighted characters, whether its lines lie horizontal)."""
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            # One thread: the pool already runs one worker per core.
            self._engine = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
        found, _elapse = self._engine(image)
        if not found:
            return "", 0.0, True
        lines = [(box, str(text), float(score)) for box, text, score in found]
        upright = _horizontal(lines)
        text = "\n".join(text for _, text, _ in lines)
        weight = sum(len(text) * score for _, text, score in lines)
        return text, weight, upright


def render(page: Any) -> npt.NDArray[np.uint8]:
    """The page as an RGB array whose long side is about TARGET_SIDE_PX."""
    import numpy as np

    width, height = page.get_size()
    scale = min(MAX_SCALE, max(MIN_SCALE, TARGET_SIDE_PX / max(width, height, 1.0)))
    bitmap = page.render(scale=scale)
    image: npt.NDArray[np.uint8] = bitmap.to_numpy()
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def _horizontal(lines: list[tuple[Any, str, float]]) -> bool:
    """Most detected lines wider than tall: the page is not turned a quarter."""
    import numpy as np

    wide = tall = 0
    for box, text, _score in lines:
        points = np.asarray(box, dtype=np.float32)
        span = points.max(axis=0) - points.min(axis=0)
        if len(text) < 3:
            continue  # single characters say nothing about direction
        if span[0] >= span[1]:
            wide += 1
        else:
            tall += 1
    return wide >= tall
