"""Dynamic batching: requests for the same model and operation share one forward pass.

    engine = BatchingEngine("clip", run_batch, BatchingConfig(max_batch_size=16, max_wait_ms=5))
    await engine.start()
    with engine.admit(n_items) as ticket:          # QueueFullError (429) at once when the queue is full
        payload = decode_images(...)                # only admitted requests pay for decoding
        job = ticket.submit(payload, op="embed_image")
        result = await job.result(disconnected=watch_disconnect(request.receive))

``run_batch(jobs) -> results`` runs in the engine's own worker thread (one per model, so a model never
runs two batches at once) and returns one result per job, or an exception for a job that failed alone.
Streaming operations call ``job.emit(chunk)`` as they go and check ``job.active`` to drop callers that
left or ran out of time. If ``run_batch`` raises, the jobs are re-run one by one, so one bad item fails
only its own request.

A batch starts when ``max_batch_size`` jobs with the same key are waiting, or ``max_wait_ms`` after its
oldest job arrived, whichever comes first, and at once when no other admitted request is still preparing
its items (nothing else is on the way, so waiting would only add latency); while a batch runs, the next
one fills up. Admission counts items, waiting or running, so queued memory is bounded by ``max_queue``.

``continuous.ContinuousBatchingEngine`` keeps this admission, queue and deadline logic but lets its
worker take waiting jobs into a running batch between steps (chat generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmstack.serve.config import BatchingConfig
from mmstack.serve.errors import APIError, ClientDisconnectedError, DeadlineExceededError, QueueFullError

log = logging.getLogger("mmstack.serve")
POLL_S = 0.05  # how often a waiting request checks whether its client is still there
_END = object()

Disconnected = Callable[[], Awaitable[bool]] | None


def watch_disconnect(receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[bool]]:
    """A cheap "has the client gone?" check for a request whose body has been read (``receive``: its ASGI
    receive callable, e.g. ``request.receive``).

    One pending ``receive()`` per request answers every later check with a ``done()`` look. Starlette's
    ``Request.is_disconnected`` opens and cancels a receive at each call instead: at 20 checks a second per
    waiting request that cost 0.7 ms of event loop per 16-token chat (BENCHMARKS.md, session 23), and it grows
    with the queue.
    """
    pending: asyncio.Future | None = None

    async def disconnected() -> bool:
        nonlocal pending
        if pending is None:
            pending = asyncio.ensure_future(receive())
        if not pending.done():
            return False
        message, pending = pending.result(), None  # anything but a disconnect: watch again at the next check
        return message.get("type") == "http.disconnect"

    return disconnected


class Job:
    """One item's place in the queue: its payload, deadline, result and (streaming) chunks."""

    def __init__(self, payload: Any, op: str, group: Hashable, deadline: float, stream: bool) -> None:
        self.payload = payload
        self.op = op
        self.key = (op, group)
        self.deadline = deadline
        self.enqueued_at = time.monotonic()
        self.cancelled = False
        self.emitted = False
        self._checked = self.enqueued_at
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future = self._loop.create_future()
        self._chunks: asyncio.Queue | None = asyncio.Queue() if stream else None

    @property
    def active(self) -> bool:
        """Still wanted: not cancelled (client gone) and before its deadline. Safe to read from any thread."""
        return not self.cancelled and time.monotonic() < self.deadline

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def streaming(self) -> bool:
        """Submitted with ``stream=True``: the caller reads chunks as they are emitted."""
        return self._chunks is not None

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, chunk: Any) -> None:
        """Send a partial result to the caller (called from the worker thread)."""
        if self._chunks is None:
            raise RuntimeError("emit() on a job that was not submitted with stream=True")
        self.emitted = True
        self._loop.call_soon_threadsafe(self._chunks.put_nowait, chunk)

    def _settle(self, outcome: Any) -> None:
        if self._future.done():
            return
        if isinstance(outcome, BaseException):
            self._future.set_exception(outcome)
            self._future.exception()  # marks it retrieved: a caller that left must not cause a warning
        else:
            self._future.set_result(outcome)
        if self._chunks is not None:
            self._chunks.put_nowait(_END)

    async def result(self, disconnected: Disconnected = None) -> Any:
        """The job's result; raises its error, ``DeadlineExceededError`` or ``ClientDisconnectedError``."""
        return await self._wait(self._future, disconnected)

    async def stream(self, disconnected: Disconnected = None) -> AsyncIterator[Any]:
        """The emitted chunks as they come; ends when the job finishes (its error is raised here)."""
        if self._chunks is None:
            raise RuntimeError("stream() on a job that was not submitted with stream=True")
        while True:
            getter = asyncio.ensure_future(self._chunks.get())
            try:
                chunk = await self._wait(getter, disconnected)
            finally:
                getter.cancel()
            if chunk is _END:
                await self.result()  # raises the job's error, if any
                return
            yield chunk

    async def _wait(self, awaitable: asyncio.Future, disconnected: Disconnected) -> Any:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.cancel()
                raise DeadlineExceededError("the request did not finish before its deadline; retry later")
            # A fast stream always has a chunk ready, so the client is checked by the clock, not only when idle.
            if disconnected is not None and time.monotonic() - self._checked >= POLL_S:
                self._checked = time.monotonic()
                if await disconnected():
                    self.cancel()
                    raise ClientDisconnectedError("the client disconnected")
            timeout = min(remaining, POLL_S) if disconnected is not None else remaining
            done, _ = await asyncio.wait({awaitable}, timeout=timeout)
            if done:
                return awaitable.result()


class Ticket:
    """Admission of ``n`` items; ``release`` (or leaving the ``with`` block) returns the slots and
    cancels any job of this ticket that has not finished."""

    def __init__(self, engine: BatchingEngine, n: int, deadline: float) -> None:
        self.engine, self.n, self.deadline = engine, n, deadline
        self.jobs: list[Job] = []
        self._released = False

    def submit(self, payload: Any, op: str = "default", group: Hashable = None, stream: bool = False) -> Job:
        """Queue one item; jobs with the same ``op`` and ``group`` may share a batch."""
        if len(self.jobs) >= self.n:
            raise RuntimeError(f"ticket admitted {self.n} items, cannot submit more")
        job = Job(payload, op, group, self.deadline, stream)
        self.jobs.append(job)
        self.engine._enqueue(job)
        return job

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for job in self.jobs:
            if not job.done:
                job.cancel()
        self.engine._release(self.n)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BatchingEngine:
    """Coalesces jobs for one model into batches run by ``run_batch`` in a worker thread.

    Args:
        name: the model's served name (metrics label, thread name).
        run_batch: ``(list[Job]) -> Sequence[result | Exception]``, one entry per job, same order.
        config: batch size, wait, queue bound and default deadline.
        metrics: optional ``ServeMetrics`` (batch sizes, queue depth, rejections).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Job]], Sequence[Any]],
        config: BatchingConfig | None = None,
        metrics: Any = None,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.config = config or BatchingConfig()
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._admitted = 0
        self._batch_s = 0.0  # moving average of batch run time, for Retry-After
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        if metrics is not None:
            metrics.watch_queue(name, lambda: len(self._pending), lambda: self._admitted)

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{self.name}")
        self._task = asyncio.create_task(self._serve(), name=f"batching-{self.name}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while self._pending:
            self._pending.popleft()._settle(APIError("the server is shutting down", status=503, type="server_error"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------ admission

    @property
    def admitted(self) -> int:
        """Items admitted and not yet released (waiting or running)."""
        return self._admitted

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    def admit(self, n: int = 1, timeout_s: float | None = None) -> Ticket:
        """Reserve ``n`` queue slots, or raise ``QueueFullError`` (429 with Retry-After) at once."""
        if n > self.config.max_queue:
            raise APIError(f"a request may hold at most {self.config.max_queue} items for this model, got {n}")
        if self._admitted + n > self.config.max_queue:
            if self.metrics is not None:
                self.metrics.rejected(self.name, "queue_full")
            raise QueueFullError(
                f"model {self.name!r} is busy ({self._admitted} items queued); retry after the Retry-After delay",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._admitted += n
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        return Ticket(self, n, time.monotonic() + timeout)

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained (at least 1)."""
        batches = self._admitted / self.config.max_batch_size + 1
        return max(1, math.ceil(self.config.max_wait_ms / 1000 + batches * self._batch_s))

    def _release(self, n: int) -> None:
        self._admitted -= n
        if self._wakeup is not None:
            self._wakeup.set()  # a batch waiting for company looks again

    def _enqueue(self, job: Job) -> None:
        if self._task is None or self._wakeup is None:
            raise RuntimeError(f"batching engine {self.name!r} is not started")
        self._pending.append(job)
        self._wakeup.set()

    # ------------------------------------------------------------------------------------- batching

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                await self._run(batch)
            except Exception as err:  # the loop must outlive any failure, or every later request would hang
                log.error("batching loop of %s failed", self.name, exc_info=err)
                for job in batch:
                    job._settle(err)

    async def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._execute, batch)
        seconds = time.perf_counter() - t0
        self._batch_s = seconds if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * seconds
        for job, outcome in zip(batch, outcomes, strict=True):
            job._settle(outcome)
        if self.metrics is not None:
            self.metrics.batch(self.name, batch[0].op, len(batch), seconds)

    async def _next_batch(self) -> list[Job]:
        """Wait for work, then for a full batch or the oldest job's ``max_wait_ms``; take the batch."""
        assert self._wakeup is not None
        while not self._drop_dead_head():
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._pending[0]
        until = first.enqueued_at + self.config.max_wait_ms / 1000
        while self._count(first.key) < self.config.max_batch_size and self._company_coming():
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return self._take(first.key)

    def _company_coming(self) -> bool:
        """More items are admitted than queued: requests still preparing their items (decoding images)
        will be queued soon, so a batch is worth waiting for. Otherwise waiting would only add latency."""
        return self._admitted > len(self._pending)

    def _drop_dead_head(self) -> bool:
        """Drop cancelled/expired jobs at the head; True when a live job is waiting."""
        while self._pending and not self._pending[0].active:
            self._retire(self._pending.popleft())
        return bool(self._pending)

    def _retire(self, job: Job) -> None:
        if job.cancelled:
            job._settle(ClientDisconnectedError("the client disconnected"))
        else:
            if self.metrics is not None:
                self.metrics.rejected(self.name, "deadline")
            job._settle(DeadlineExceededError("the request waited past its deadline in the queue; retry later"))

    def _count(self, key: Hashable) -> int:
        return sum(1 for j in self._pending if j.key == key and j.active)

    def _take(self, key: Hashable) -> list[Job]:
        batch, rest = [], deque()
        for job in self._pending:
            if job.key == key and len(batch) < self.config.max_batch_size and job.active:
                batch.append(job)
            elif job.key == key and not job.active:
                self._retire(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _execute(self, batch: list[Job]) -> list[Any]:
        """Run a batch in the worker thread; on failure re-run its jobs one by one to isolate the bad one."""
        try:
            out = list(self.run_batch(batch))
            if len(out) != len(batch):
                raise RuntimeError(f"run_batch returned {len(out)} results for {len(batch)} jobs")
            return out
        except Exception as err:
            if len(batch) == 1:
                log_failure(self.name, err)
                return [err]
            log.info("batch of %d for %s failed (%s); re-running its jobs one by one", len(batch), self.name, err)
            # A job that already streamed part of its answer cannot be re-run without repeating it.
            return [err if job.emitted else self._execute([job])[0] for job in batch]


def log_failure(name: str, err: BaseException) -> None:
    from mmstack.errors import MmstackError

    if isinstance(err, MmstackError):
        log.info("request to %s failed: %s", name, err)
    else:
        log.error("request to %s failed with an internal error", name, exc_info=err)
