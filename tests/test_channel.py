"""Bounded channels: backpressure, batching and close semantics."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.channel import Channel, ChannelClosed


async def test_put_waits_while_the_channel_is_full() -> None:
    channel: Channel[int] = Channel(2)
    await channel.put(1)
    await channel.put(2)
    blocked = asyncio.create_task(channel.put(3))
    await asyncio.sleep(0)
    assert not blocked.done() and channel.statistics().waiting_senders == 1
    assert await channel.get_batch(1) == [1]
    async with asyncio.timeout(5):
        await blocked
    assert channel.depth == 2


async def test_put_many_fills_what_room_there_is_and_waits_for_the_rest_in_order() -> None:
    channel: Channel[int] = Channel(2)
    sender = asyncio.create_task(channel.put_many(range(5)))
    await asyncio.sleep(0)
    assert not sender.done() and channel.depth == 2  # held back at capacity, like put
    taken = []
    async with asyncio.timeout(5):
        while len(taken) < 5:
            taken += await channel.get_batch(3)
        await sender
    assert taken == [0, 1, 2, 3, 4]


async def test_get_batch_takes_what_is_ready_without_waiting_for_more() -> None:
    channel: Channel[int] = Channel(10)
    for n in range(3):
        await channel.put(n)
    assert await channel.get_batch(8) == [0, 1, 2]
    await channel.put(3)
    assert await channel.get_batch(2) == [3]


async def test_readers_drain_then_see_the_end_once_closed() -> None:
    channel: Channel[int] = Channel(4)
    await channel.put(1)
    await channel.put(2)
    channel.close()
    assert [n async for n in channel] == [1, 2]
    assert await channel.get_batch(5) == []


async def test_close_wakes_waiting_readers_and_fails_waiting_senders() -> None:
    channel: Channel[int] = Channel(1)
    empty: Channel[int] = Channel(1)
    waiting_reader = asyncio.create_task(empty.get_batch(1))
    await channel.put(0)
    waiting_sender = asyncio.create_task(channel.put(1))
    await asyncio.sleep(0)
    empty.close()
    channel.close()
    async with asyncio.timeout(5):
        assert await waiting_reader == []
        with pytest.raises(ChannelClosed):
            await waiting_sender
    with pytest.raises(ChannelClosed):
        await channel.put(2)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Channel(0)


async def test_a_lingering_reader_fills_its_batch_from_items_that_arrive_meanwhile() -> None:
    channel: Channel[int] = Channel(100)
    await channel.put(0)  # a lone item: the reader waits for more, not longer than its linger
    reader = asyncio.create_task(channel.get_batch(4, linger=30.0))
    second = asyncio.create_task(channel.get_batch(4, linger=30.0))  # waits its turn
    await asyncio.sleep(0)
    for n in (1, 2, 3, 4, 5):  # a burst arrives while it lingers
        await channel.put(n)
    async with asyncio.timeout(5):  # full long before the 30 s linger ends
        assert await reader == [0, 1, 2, 3]
    channel.close()
    async with asyncio.timeout(5):
        assert await second == [4, 5]  # closing ends the linger with what there is


async def test_a_lingering_reader_sends_a_short_batch_when_its_linger_runs_out() -> None:
    channel: Channel[int] = Channel(10)
    await channel.put(7)
    async with asyncio.timeout(5):
        assert await channel.get_batch(4, linger=0.05) == [7]
