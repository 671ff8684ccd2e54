"""Micro-batching for the server: concurrent requests share engine passes.

Requests go into a bounded queue (bounded in sequences and in tokens). One worker task takes the
oldest request, waits up to ``max_wait_s`` for more, gathers whatever fits ``max_batch_tokens``,
and runs one :meth:`TeacherEngine.score` call in a worker thread (the event loop stays free to
accept and reject requests meanwhile). Each request's records go back to its own future.

When the queue is full, :meth:`MicroBatcher.submit` raises :class:`QueueFull` at once: the server
answers 429 with Retry-After rather than holding unbounded memory.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from teacher_service.engine import ScoreRequest, TeacherEngine


class QueueFull(RuntimeError):
    """The server is at capacity; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the scoring queue is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Pending:
    requests: Sequence[ScoreRequest]
    top_k: int | None
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    detailed: bool = False  #: records with their PositionDetail (the scoring protocols)

    @property
    def kind(self) -> tuple[int | None, bool]:
        """Requests of one kind share an engine pass."""
        return self.top_k, self.detailed


class MicroBatcher:
    def __init__(self, engine: TeacherEngine, *, max_batch_tokens: int, max_wait_s: float = 0.005,
                 max_queue_requests: int = 256, max_queue_tokens: int | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_requests = max_queue_requests
        self.max_queue_tokens = max_queue_tokens or 16 * max_batch_tokens
        self.on_batch = on_batch  # (sequences, tokens, seconds) -> None, for metrics
        self._queue: list[_Pending] = []
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-engine")
        self._task: asyncio.Task | None = None
        self._seconds_per_token = 1e-4  # running estimate, for Retry-After
        self.in_flight = 0

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish everything queued and in flight, then stop the worker."""
        while self._queue or self.in_flight:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, requests: Sequence[ScoreRequest], top_k: int | None, *,
                     detailed: bool = False) -> list:
        """Each request's record (with ``detailed``: ``(record, PositionDetail)``), in order;
        :class:`QueueFull` at once when the queue is at capacity."""
        tokens = sum(len(r.input_ids) for r in requests)
        if (len(self._queue) >= self.max_queue_requests
                or (self._queue and self._queued_tokens + tokens > self.max_queue_tokens)):
            backlog = self._queued_tokens + tokens
            raise QueueFull(max(1.0, backlog * self._seconds_per_token))
        pending = _Pending(requests, top_k, tokens, asyncio.get_running_loop().create_future(),
                           detailed=detailed)
        self._queue.append(pending)
        self._queued_tokens += tokens
        self._wakeup.set()
        return await pending.future

    async def call(self, fn: Callable, *args):
        """``fn(*args)`` on the engine's thread, between the passes (the engine is used by one
        thread at a time); counted as in flight, so :meth:`stop` waits for it."""
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.in_flight -= 1

    def _take_batch(self) -> list[_Pending]:
        batch, tokens = [], 0
        while self._queue:
            nxt = self._queue[0]
            if batch and (tokens + nxt.tokens > self.max_batch_tokens or nxt.kind != batch[0].kind):
                break
            batch.append(self._queue.pop(0))
            tokens += nxt.tokens
            self._queued_tokens -= nxt.tokens
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # A short window for concurrent requests to join this pass.
            oldest = self._queue[0].enqueued
            delay = self.max_wait_s - (time.monotonic() - oldest)
            if delay > 0 and self._queued_tokens < self.max_batch_tokens:
                await asyncio.sleep(delay)
            batch = self._take_batch()
            flat = [r for p in batch for r in p.requests]
            tokens = sum(p.tokens for p in batch)
            self.in_flight += len(batch)
            started = time.perf_counter()
            try:
                score = self.engine.score_detailed if batch[0].detailed else self.engine.score
                records = await loop.run_in_executor(
                    self._executor, lambda: score(flat, top_k=batch[0].top_k))
            except Exception as exc:  # engine failure: every caller in the pass gets it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                elapsed = time.perf_counter() - started
                self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * elapsed / max(tokens, 1)
                if self.on_batch:
                    self.on_batch(len(flat), tokens, elapsed)
                start = 0
                for p in batch:
                    n = len(p.requests)
                    if not p.future.done():
                        p.future.set_result(records[start:start + n])
                    start += n
            finally:
                self.in_flight -= len(batch)
