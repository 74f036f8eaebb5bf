"""Dynamic batching: concurrent requests merged into one call of the network.

Requests queue up while the network computes; the next call takes every request waiting (up to
`max_images` images, whole requests only), waiting at most `max_wait_s` after the first for more
to arrive, but only while requests come together (the last call held more than one): a lone
client waits for nobody. The wait also ends once the call holds as many requests as can come
(`expected`: the worker's open connections, each with at most one request in flight), so clients
that are all in wait no longer. A big batch runs in one thread of its own, so the event loop keeps
reading requests meanwhile; a small one runs in the loop's thread. The busier the server, the
bigger its batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("pipeline.serving.batching")

# Batches up to this many images run in the event loop's own thread. Measured with 8 clients on 2 cores
# (bf16): one-image requests took 0.98 ms of server CPU each so, 1.28 ms through the thread (2 thread
# switches a batch); batches of 64 did 4,300 images/s through the thread, 3,400 in the loop, which
# cannot read the next requests while the network runs.
INLINE_IMAGES = 16

# One call of the network on a batch: float (N, 1, 28, 28) -> (probabilities (N, 10), what answered).
Run = Callable[[torch.Tensor], tuple[Any, Any]]


@dataclass(frozen=True)
class BatchLimits:
    """The cap on images per call of the network, and on the wait for more requests to join one."""

    max_images: int
    max_wait_s: float

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {self.max_images}")
        if not 0 <= self.max_wait_s <= 1:
            raise ValueError(f"max_wait_s must lie in [0, 1] seconds, got {self.max_wait_s}")


class Batcher:
    """`await batcher.submit(x)` -> (probabilities of x's images, what answered); many callers, one network call."""

    def __init__(self, run: Run, limits: BatchLimits, expected: Callable[[], int] | None = None) -> None:
        self.run, self.limits = run, limits
        self.expected = expected or (lambda: limits.max_images)  # how many requests can come at most
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="network")  # one call at a time: the threads are torch's
        self.task: asyncio.Task | None = None
        self.held: tuple[torch.Tensor, asyncio.Future] | None = None  # did not fit the last batch: first of the next
        self.together = False  # whether the last call held more than one request: only then is it worth a wait

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.pool.shutdown(wait=True)

    async def submit(self, x: torch.Tensor) -> tuple[Any, Any]:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, future))
        return await future

    async def gather(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        """The next batch: the first request, then those waiting or arriving within max_wait_s."""
        items = [self.held or await self.queue.get()]
        self.held = None
        images, loop = len(items[0][0]), asyncio.get_running_loop()
        await asyncio.sleep(0)  # one turn of the event loop: requests already read join without waiting
        deadline = loop.time() + (self.limits.max_wait_s if self.together else 0)
        while images < self.limits.max_images and len(items) < self.expected():
            if self.queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)  # the next one, as soon as it comes
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            if images + len(item[0]) > self.limits.max_images:
                self.held = item
                break
            items.append(item)
            images += len(item[0])
        self.together = len(items) > 1
        return [(x, f) for x, f in items if not f.done()]  # a cancelled caller (client gone) costs nothing

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self.gather()
            if not items:
                continue
            x = items[0][0] if len(items) == 1 else torch.cat([x for x, _ in items])  # (N, 1, 28, 28)
            try:
                if len(x) <= INLINE_IMAGES:  # about a millisecond: handing it to the thread costs more
                    probs, tag = self.run(x)
                else:
                    probs, tag = await loop.run_in_executor(self.pool, self.run, x)
            except Exception as e:  # the callers get it: one failed batch, not a dead server
                log.exception("the network failed on a batch of %d", len(x))
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            start = 0
            for xi, f in items:
                if not f.done():
                    f.set_result((probs[start : start + len(xi)], tag))
                start += len(xi)
