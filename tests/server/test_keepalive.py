"""keepalive.py: one ticker for every stream; a stream quiet for two ticks (half an interval each) gets
a TICK, one that sends gets none, and a closed one is forgotten."""

import asyncio

from server.keepalive import TICK, KeepAlive


def test_only_quiet_streams_are_ticked():
    keepalive = KeepAlive(interval=1.0)
    busy, quiet, gone = (keepalive.open(asyncio.Queue()) for _ in range(3))
    keepalive.close(gone)
    for _ in range(6):
        keepalive.tick()
        busy.ticks = 0  # it sent something since
    assert busy.queue.empty() and gone.queue.empty()
    assert [quiet.queue.get_nowait() for _ in range(quiet.queue.qsize())] == [TICK] * 3  # every second tick
    assert keepalive.streams == {busy, quiet}


def test_ticker_runs_every_half_interval():
    async def main():
        keepalive = KeepAlive(interval=0.04)
        stream = keepalive.open(asyncio.Queue())
        task = asyncio.create_task(keepalive.run())
        item = await asyncio.wait_for(stream.queue.get(), 5)
        task.cancel()
        return item
    assert asyncio.run(main()) is TICK
