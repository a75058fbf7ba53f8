"""Running one batch to per-item results: retries, splitting, error typing.

A batch holds items of many documents, so its failure must not become theirs.
Transient errors are retried as a whole (the retry policy decides how often and
how long to wait). A permanent error on a batch of several items splits it in
halves, recursively, until the items at fault are alone: a 400 for one chunk
among 64 fails one document, at the cost of about log2(64) extra calls. Any
other exception is a bug in the stage: its items fail with reason "bug" (after
the same splitting), the run goes on. FatalError alone escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from pipeline.errors import FatalError, PermanentError, StageError, TransientError
from pipeline.retry import RetryPolicy
from pipeline.stage import Item
from pipeline.systemic import SystemicCheck

__all__ = ["Failures", "run_batch"]

logger = logging.getLogger(__name__)

Failures = list[tuple[Item, StageError]]


async def run_batch(
    run: Callable[[list[Item]], Awaitable[list[Item]]],
    items: list[Item],
    *,
    retry: RetryPolicy,
    stage: str,
    verdict: SystemicCheck | None = None,
) -> tuple[list[Item], Failures]:
    """The outputs of the items that succeeded, and each failed item with its error.

    `verdict` hears of every success and refusal as they happen, so a refusal that
    every document meets stops the run before the batches are split down to items.
    """
    try:
        outputs = [*await retry.call(lambda: run(items))]
        if verdict is not None:
            verdict.succeeded()
        return outputs, []
    except TransientError as exc:
        tries = retry.attempts
        gave_up = TransientError(f"{exc} (gave up after {tries} attempts)", reason=exc.reason)
        gave_up.stage = exc.stage  # a stage fused into this one, if it raised it
        return [], [(item, gave_up) for item in items]
    except FatalError:
        raise
    except PermanentError as exc:
        if verdict is not None:
            verdict.refused(items, exc)
        error: StageError = exc
    except Exception as exc:  # noqa: BLE001 - a stage bug fails its items, not the run
        logger.exception("stage %s raised an unexpected error", stage)
        error = PermanentError(f"{type(exc).__name__}: {exc}", reason="bug")
    if len(items) == 1:
        return [], [(items[0], error)]
    middle = len(items) // 2
    left = await run_batch(run, items[:middle], retry=retry, stage=stage, verdict=verdict)
    right = await run_batch(run, items[middle:], retry=retry, stage=stage, verdict=verdict)
    return left[0] + right[0], left[1] + right[1]
