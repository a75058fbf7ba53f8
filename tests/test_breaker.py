"""The circuit breaker in the retry policy: an unavailable server holds the whole pool on one
probe, costs no attempts, and stops the run once it has been gone for max_wait_s."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.errors import FatalError, TransientError
from pipeline.retry import RetryPolicy


def gone() -> TransientError:
    return TransientError("connection refused", reason="connection", unavailable=True)


async def test_an_unavailable_server_costs_no_attempts_and_one_probe_goes_out_at_a_time() -> None:
    policy = RetryPolicy(attempts=2, base=0.01, cap=0.02, max_wait_s=30)
    down_for = 6  # calls that find the server gone
    in_flight = most = calls = 0

    async def call() -> str:
        nonlocal in_flight, most, calls, down_for
        calls += 1
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0)
            if down_for > 0:
                down_for -= 1
                raise gone()
            return "ok"
        finally:
            in_flight -= 1

    first = await asyncio.wait_for(policy.call(call), timeout=10)  # opens the breaker
    assert first == "ok"
    down_for = 5
    results = await asyncio.wait_for(
        asyncio.gather(*(policy.call(call) for _ in range(20))), timeout=10
    )
    assert results == ["ok"] * 20  # 2 attempts each, yet 5 refusals cost nobody anything
    assert not policy.breaker.open


async def test_while_open_only_the_probe_calls() -> None:
    policy = RetryPolicy(attempts=3, base=0.01, cap=0.02, max_wait_s=30)
    policy.breaker.failed(probe=False, reason="connection refused")
    concurrent = most_while_open = calls_while_open = 0
    refusals = 4

    async def call() -> str:
        nonlocal concurrent, most_while_open, calls_while_open, refusals
        was_open = policy.breaker.open
        concurrent += 1
        if was_open:
            calls_while_open += 1
            most_while_open = max(most_while_open, concurrent)
        await asyncio.sleep(0.001)
        concurrent -= 1
        if refusals:
            refusals -= 1
            raise gone()
        return "ok"

    await asyncio.wait_for(asyncio.gather(*(policy.call(call) for _ in range(10))), timeout=10)
    assert calls_while_open == 5  # four refused probes, then the one that closed it
    assert most_while_open == 1


async def test_a_server_gone_past_max_wait_s_stops_the_run() -> None:
    policy = RetryPolicy(attempts=2, base=0.01, cap=0.05, max_wait_s=0.3)

    async def call() -> str:
        raise gone()

    began = time.monotonic()
    with pytest.raises(FatalError, match="did not come back within 0.3 s"):
        await asyncio.wait_for(policy.call(call), timeout=10)
    assert 0.3 <= time.monotonic() - began < 3


async def test_an_answer_of_any_kind_closes_the_breaker() -> None:
    policy = RetryPolicy(attempts=1, base=0.01, cap=0.02, max_wait_s=30)
    policy.breaker.failed(probe=False, reason="connection refused")

    async def call() -> str:
        raise TransientError("HTTP 500", reason="http_500")

    with pytest.raises(TransientError, match="500"):
        await asyncio.wait_for(policy.call(call), timeout=10)
    assert not policy.breaker.open
