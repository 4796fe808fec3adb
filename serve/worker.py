"""The one thread that runs the model: a FIFO of steps shared by every session.

A GPU (or the CPU) does one thing at a time, and the model's modules (the VAE's causal feature
cache, CUDA graphs) are not safe to use from two threads at once. So every piece of model work —
building a session's generator, one chunk of a shot, closing an abandoned shot — is a step queued
here and run in order by one thread. A shot is a python generator advanced one chunk per step, so
the chunks of concurrent sessions interleave: each session waits at most one chunk per other
active session, whatever their shot lengths.

Async code awaits a step's result through an asyncio future completed from this thread with
`loop.call_soon_threadsafe`. A step that raises fails only its own future; the thread goes on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

_STOP = object()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Complete `future` on its loop, unless its awaiter gave up (cancelled) meanwhile."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future refuses StopIteration itself
        future.set_exception(RuntimeError(f"a step raised StopIteration{f': {error}' if str(error) else ''}"))
    else:
        future.set_exception(error)


class ChunkWorker:
    """Runs submitted steps one at a time, in submission order, on one daemon thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="shotdistill-worker", daemon=True)
        self._thread.start()

    def submit(self, step: Callable[[], Any]) -> asyncio.Future:
        """Queue `step`; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((step, future, loop))
        return future

    def post(self, step: Callable[[], Any]) -> None:
        """Queue `step` with nobody waiting for it (cleanup that must run after the steps before it)."""
        self._queue.put((step, None, None))

    def depth(self) -> int:
        """Steps queued and not yet started."""
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            self._run(*item)
            del item  # a finished step (and the session it holds) is freed now, not when the next arrives

    @staticmethod
    def _run(step: Callable[[], Any], future: asyncio.Future | None, loop: asyncio.AbstractEventLoop | None) -> None:
        if future is not None and future.cancelled():  # its awaiter left (a disconnect): skip the work
            return
        result, error = None, None
        try:
            result = step()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiter; the worker must survive
            error = e
        if future is not None:
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed (server shutdown): nobody is waiting
                pass
