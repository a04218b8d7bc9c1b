"""Continuous batching: waiting requests join a running generation between decode steps.

With plain batching a request that arrives while a generation runs waits for the whole batch to end.
Here the worker thread keeps one running batch and, before every decode step, takes the jobs that have
arrived since (up to ``max_batch_size`` rows), prefills them and decodes them together with the rows
already running; a row that finishes leaves at once and its caller gets its answer at once.

    engine = ContinuousBatchingEngine("vlm", run_continuous, BatchingConfig(max_batch_size=32))

``run_continuous(feed)`` runs in the engine's worker thread and returns when it has no rows left and
``feed.take`` gives nothing. Through the ``Feed`` it takes jobs (``take``), answers them (``finish``) and
reports its forward passes (``record``). Admission (429), deadlines and disconnects are the
``BatchingEngine``'s: the same ``admit``/``Ticket``/``Job`` API, and jobs past their deadline or whose
client left are dropped when taken and by the generation loop at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from mmstack.serve.batching import BatchingEngine, Job
from mmstack.serve.config import BatchingConfig

log = logging.getLogger("mmstack.serve")


class Feed:
    """The worker's side of a ``ContinuousBatchingEngine``: safe to call from the worker thread."""

    def __init__(self, engine: ContinuousBatchingEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self.open: set[Job] = set()  # taken and not yet finished

    @property
    def capacity(self) -> int:
        """Most rows the running batch may hold (``max_batch_size``)."""
        return self.engine.config.max_batch_size

    @property
    def stopping(self) -> bool:
        """The engine is shutting down: finish the rows with an error and return."""
        return self.engine._stopping

    def take(self, n: int) -> list[Job]:
        """Up to ``n`` waiting live jobs, oldest first (of any op or group)."""
        # Only this thread removes jobs while the worker runs and the event loop only appends: both are
        # atomic deque operations, so no lock is needed.
        pending, jobs = self.engine._pending, []
        while pending and len(jobs) < n and not self.stopping:
            job = pending.popleft()
            if job.active:
                jobs.append(job)
                self.open.add(job)
            else:
                self._call(self.engine._retire, job)
        return jobs

    def finish(self, job: Job, outcome: Any, seconds: float | None = None) -> None:
        """Answer ``job`` with its result or exception; ``seconds``: how long it ran (for Retry-After)."""
        self.open.discard(job)
        self._call(job._settle, outcome)
        if seconds is not None:
            e = self.engine
            e._batch_s = seconds if e._batch_s == 0 else 0.8 * e._batch_s + 0.2 * seconds

    def record(self, op: str, size: int, seconds: float) -> None:
        """One forward pass over ``size`` rows (metrics: batch size and time by op)."""
        if self.engine.metrics is not None:
            self.engine.metrics.batch(self.engine.name, op, size, seconds)

    def _call(self, fn: Callable, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            self.loop.call_soon_threadsafe(fn, *args)


class ContinuousBatchingEngine(BatchingEngine):
    """A ``BatchingEngine`` whose worker runs ``run_continuous(feed)``: one running batch that waiting jobs
    join at every step (see the module docstring).

    Args:
        name: the model's served name (metrics label, thread name).
        run_continuous: ``(Feed) -> None``; answers every job it takes through ``feed.finish``.
        config: ``max_batch_size`` (rows at once), ``max_wait_ms`` (how long the first job of an idle
            engine waits for company), queue bound and default deadline.
        metrics: optional ``ServeMetrics``.
    """

    def __init__(
        self,
        name: str,
        run_continuous: Callable[[Feed], None],
        config: BatchingConfig | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, _unused, config, metrics)
        self.run_continuous = run_continuous
        self._stopping = False

    async def stop(self) -> None:
        self._stopping = True
        await super().stop()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._first_jobs()
            feed = Feed(self, loop)
            try:
                await loop.run_in_executor(self._executor, self.run_continuous, feed)
            except Exception as err:  # the loop must outlive any failure, or every later request would hang
                log.error("generation loop of %s failed", self.name, exc_info=err)
                for job in list(feed.open):
                    feed.finish(job, err)
            for job in list(feed.open):  # a worker that returned without answering a job it took
                feed.finish(job, RuntimeError(f"the generation loop of {self.name} dropped a request"))

    async def _first_jobs(self) -> None:
        """Wait for a live job, then up to ``max_wait_ms`` for a full first batch while company is coming."""
        assert self._wakeup is not None
        while not self._drop_dead_head():
            self._wakeup.clear()
            await self._wakeup.wait()
        until = self._pending[0].enqueued_at + self.config.max_wait_ms / 1000
        while len(self._pending) < self.config.max_batch_size and self._company_coming():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return


def _unused(jobs: list[Job]) -> list[Any]:
    raise RuntimeError("a continuous batching engine runs run_continuous, not run_batch")
