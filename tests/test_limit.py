"""The adaptive concurrency limit, driven by a fake clock: what it learns from each call."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.limit import AdaptiveLimit, Permit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def round_trip(limit: AdaptiveLimit, clock: Clock, seconds: float, *, size: int = 8) -> None:
    """Every slot the limit allows goes out at once and comes back after `seconds`."""
    permits: list[Permit] = []
    for _ in range(limit.limit):
        permit = await limit.acquire()
        limit.begin(permit)
        permits.append(permit)
    clock.now += seconds
    for permit in permits:
        limit.release(permit, size=size)


async def test_flat_latency_under_load_climbs_to_the_ceiling() -> None:
    clock = Clock()
    limit = AdaptiveLimit(64, initial=4, clock=clock)
    for _ in range(6):
        await round_trip(limit, clock, 0.3)  # a server that scales: latency never moves
    assert limit.limit == 64
    assert limit.stats().highest == 64 and limit.stats().trace[0] == (0.0, 4)


async def test_latency_that_grows_with_load_brings_the_limit_down_to_what_the_server_serves() -> (
    None
):
    clock = Clock()
    limit = AdaptiveLimit(64, initial=16, clock=clock)
    # A server computing one request at a time: with n in flight a call takes n times
    # its service time. Send 16 at once; they come back 1, 2, ... 16 service times later.
    permits = []
    for _ in range(16):
        permit = await limit.acquire()
        limit.begin(permit)
        permits.append(permit)
    for permit in permits:
        clock.now += 1.0
        limit.release(permit, size=64)
    assert limit.limit <= 3  # one being computed, about one waiting: no deep queue
    assert limit.stats().lowest <= 3


async def test_an_overload_halves_the_limit_once_per_round_trip() -> None:
    clock = Clock()
    limit = AdaptiveLimit(64, initial=32, clock=clock)
    permits = []
    for _ in range(32):
        permit = await limit.acquire()
        limit.begin(permit)
        permits.append(permit)
    for permit in permits:  # all 32 time out: one cut, not 32
        limit.release(permit, overloaded=True)
    assert limit.limit == 16
    permit = await limit.acquire()
    limit.begin(permit)
    limit.release(permit, overloaded=True)  # began after the cut: cuts again
    assert limit.limit == 8 and limit.stats().cuts == 2


async def test_an_idle_limit_does_not_grow() -> None:
    clock = Clock()
    limit = AdaptiveLimit(64, initial=8, clock=clock)
    for _ in range(50):  # one call at a time: the limit of 8 is not in use
        permit = await limit.acquire()
        limit.begin(permit)
        clock.now += 0.1
        limit.release(permit, size=1)
    assert limit.limit == 8


async def test_the_limit_stays_between_one_and_the_ceiling() -> None:
    clock = Clock()
    limit = AdaptiveLimit(3, initial=10, clock=clock)
    assert limit.limit == 3
    for _ in range(10):
        permit = await limit.acquire()
        limit.begin(permit)
        limit.release(permit, overloaded=True)
    assert limit.limit == 1


async def test_a_call_that_never_reached_the_server_teaches_nothing() -> None:
    clock = Clock()
    limit = AdaptiveLimit(8, initial=4, clock=clock)
    permit = await limit.acquire()
    limit.begin(permit)
    clock.now += 100.0
    limit.release(permit, size=0)
    assert limit.limit == 4 and limit.stats().floor_s is None


async def test_waiters_are_served_first_come_first_served_and_a_cancelled_one_gives_way() -> None:
    limit = AdaptiveLimit(1, initial=1)
    held = await limit.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        permit = await limit.acquire()
        order.append(name)
        limit.release(permit)

    first = asyncio.create_task(take("first"))
    cancelled = asyncio.create_task(take("cancelled"))
    last = asyncio.create_task(take("last"))
    await asyncio.sleep(0)  # let all three queue up
    cancelled.cancel()
    limit.release(held)
    await asyncio.gather(first, last)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert order == ["first", "last"] and limit.held == 0
