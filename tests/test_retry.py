"""Retry policy: what is retried, how long it waits, and the pool-wide cool-down;
what a batch that keeps failing leaves its items."""

from __future__ import annotations

import pytest

from pipeline.batch import run_batch
from pipeline.errors import PermanentError, TransientError
from pipeline.retry import RetryPolicy, backoff
from pipeline.stage import Item


class Clock:
    """A fake clock the policy sleeps on: tests skip the waiting, keep the arithmetic."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: list[Exception]) -> tuple[list[int], object]:
    calls = [0]

    async def call() -> str:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return "done"

    return calls, call


def test_backoff_is_capped_and_jittered() -> None:
    waits = [backoff(10, base=0.5, cap=4.0) for _ in range(200)]
    assert max(waits) <= 4.0 and min(waits) >= 0.0 and len(set(waits)) > 100


async def test_transient_errors_are_retried_then_succeed() -> None:
    clock = Clock()
    policy = RetryPolicy(attempts=4, base=0.1, cap=1.0, sleep=clock.sleep)
    calls, call = failing([TransientError("503"), TransientError("timeout")])
    assert await policy.call(call) == "done"  # type: ignore[arg-type]
    assert calls[0] == 3 and len(clock.sleeps) == 2


async def test_permanent_errors_are_not_retried() -> None:
    policy = RetryPolicy(attempts=5, base=0.1, cap=1.0, sleep=Clock().sleep)
    calls, call = failing([PermanentError("400")])
    with pytest.raises(PermanentError):
        await policy.call(call)  # type: ignore[arg-type]
    assert calls[0] == 1


async def test_the_last_transient_error_is_raised_after_the_attempt_limit() -> None:
    policy = RetryPolicy(attempts=3, base=0.1, cap=1.0, sleep=Clock().sleep)
    calls, call = failing([TransientError(f"503 #{n}") for n in range(5)])
    with pytest.raises(TransientError, match="#2"):
        await policy.call(call)  # type: ignore[arg-type]
    assert calls[0] == 3


async def test_retry_after_is_honoured_over_a_shorter_backoff() -> None:
    clock = Clock()
    policy = RetryPolicy(attempts=2, base=0.01, cap=0.05, sleep=clock.sleep)
    _, call = failing([TransientError("429", retry_after=7.0)])
    await policy.call(call)  # type: ignore[arg-type]
    assert clock.sleeps == [7.0]


async def test_a_429_cools_the_whole_pool_down() -> None:
    clock = Clock()
    policy = RetryPolicy(attempts=2, base=0.01, cap=0.05, sleep=clock.sleep)
    policy.cooldown._clock = lambda: clock.now
    _, hit = failing([TransientError("429", retry_after=5.0, cool_pool=True)])
    await policy.call(hit)  # type: ignore[arg-type]
    # The error arrived at t=0 and asked for 5 s; another worker starting a request
    # right then must wait for the pool's cool-down, not go straight in.
    clock.now = 1.0
    _, other = failing([])
    clock.sleeps.clear()
    await policy.call(other)  # type: ignore[arg-type]
    assert clock.sleeps == [pytest.approx(4.0)]


async def test_a_fused_stage_that_keeps_failing_fails_its_items_under_its_own_name() -> None:
    policy = RetryPolicy(attempts=2, base=0.1, cap=1.0, sleep=Clock().sleep)

    async def store_busy(items: list[Item]) -> list[Item]:
        error = TransientError("503 from the store", reason="http_503")
        error.stage = "store"  # raised by the store, fused after the stage that ran
        raise error

    outputs, failures = await run_batch(
        store_busy, [Item("a"), Item("b")], retry=policy, stage="embed"
    )
    assert outputs == [] and len(failures) == 2
    assert {(error.stage, error.reason) for _, error in failures} == {("store", "http_503")}
    assert "gave up after 2 attempts" in str(failures[0][1])
