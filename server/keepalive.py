"""Keep-alive comments for quiet SSE streams, from one timer for all of them.

A stream that waited for its next output with a timeout of its own (asyncio.wait_for) made a task
and a timer for every event it sent: about 35 us per event (bench/RESULTS.md), when an event
carries a single byte. Instead each stream waits on its queue alone, and one task ticks every half
interval: a stream that has sent nothing for two ticks gets TICK in its queue and sends a
keep-alive comment. So no stream is silent for longer than the interval, as before.
"""

from __future__ import annotations

import asyncio

TICK = object()  # in a stream's queue: send a keep-alive comment


class Quiet:
    """What the ticker knows of one stream: its queue, and the ticks since it last sent something."""

    __slots__ = ("queue", "ticks")

    def __init__(self, queue: asyncio.Queue):
        self.queue, self.ticks = queue, 0


class KeepAlive:
    def __init__(self, interval: float):
        self.interval = interval
        self.streams: set[Quiet] = set()

    def open(self, queue: asyncio.Queue) -> Quiet:
        """A stream starts; it sets `.ticks = 0` whenever it sends something, and calls close() at its end."""
        stream = Quiet(queue)
        self.streams.add(stream)
        return stream

    def close(self, stream: Quiet) -> None:
        self.streams.discard(stream)

    def tick(self) -> None:
        for stream in self.streams:
            stream.ticks += 1
            if stream.ticks >= 2:
                stream.ticks = 0
                stream.queue.put_nowait(TICK)

    async def run(self) -> None:
        """Tick every half interval until cancelled (the app's lifespan runs it)."""
        while True:
            await asyncio.sleep(self.interval / 2)
            self.tick()
