"""The continuous batching engine with a fake step-by-step model: joining a running batch, capacity,
deadlines in the queue, shutdown, and a worker that fails."""

from __future__ import annotations

import asyncio
import time

import pytest

from mmstack.serve.config import BatchingConfig
from mmstack.serve.continuous import ContinuousBatchingEngine
from mmstack.serve.errors import APIError, DeadlineExceededError, QueueFullError


class SteppingModel:
    """Each job's payload is how many steps it needs; every step takes ``step_s`` for all rows at once.

    Records each run (one executor call), the step at which each job joined and the rows of each step.
    """

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.runs = 0
        self.joined: dict[str, int] = {}
        self.sizes: list[int] = []

    def __call__(self, feed) -> None:
        self.runs += 1
        rows: dict = {}
        while not feed.stopping:
            for job in feed.take(feed.capacity - len(rows)):
                self.joined[job.payload[0]] = len(self.sizes)
                rows[job] = job.payload[1]
            if not rows:
                return
            time.sleep(self.step_s)
            self.sizes.append(len(rows))
            feed.record("step", len(rows), self.step_s)
            for job in list(rows):
                rows[job] -= 1
                if job.streaming:
                    job.emit(rows[job])
                if rows[job] == 0 or not job.active:
                    feed.finish(job, f"{job.payload[0]} done", 0.1)
                    del rows[job]
        for job in rows:
            feed.finish(job, APIError("the server is shutting down", status=503))


async def _started(model, **cfg) -> ContinuousBatchingEngine:
    engine = ContinuousBatchingEngine("fake", model, BatchingConfig(**{"max_wait_ms": 0, **cfg}))
    await engine.start()
    return engine


async def _call(engine, name: str, steps: int, delay: float = 0.0, timeout_s: float | None = None):
    await asyncio.sleep(delay)
    with engine.admit(timeout_s=timeout_s) as ticket:
        result = await ticket.submit((name, steps)).result()
    return result, time.perf_counter()


def test_a_request_joins_the_running_batch_and_leaves_before_it_ends():
    async def main():
        model = SteppingModel()
        engine = await _started(model)
        long = asyncio.create_task(_call(engine, "long", 60))
        short = await _call(engine, "short", 3, delay=0.1)
        long_result = await long
        await engine.stop()
        return model, short, long_result, engine

    model, (short, t_short), (long, t_long), engine = asyncio.run(main())
    assert (short, long) == ("short done", "long done")
    assert t_short < t_long - 0.1  # answered while the long one was still running
    assert model.runs == 1 and 0 < model.joined["short"] < 30  # it joined the running batch
    assert 2 in model.sizes and model.sizes[-1] == 1
    assert engine.admitted == 0 and engine.retry_after() >= 1


def test_running_rows_never_exceed_max_batch_size_and_waiting_jobs_join_as_rows_leave():
    async def main():
        model = SteppingModel(step_s=0.005)
        engine = await _started(model, max_batch_size=2)
        out = await asyncio.gather(*(_call(engine, f"j{i}", 5 + 3 * i) for i in range(5)))
        await engine.stop()
        return model, out

    model, out = asyncio.run(main())
    assert [r for r, _ in out] == [f"j{i} done" for i in range(5)]
    assert max(model.sizes) == 2 and model.runs == 1
    assert model.joined["j2"] == 5  # took the place j0 left after its 5 steps


def test_a_job_past_its_deadline_in_the_queue_never_reaches_the_model():
    async def main():
        model = SteppingModel()
        engine = await _started(model, max_batch_size=1)
        busy = asyncio.create_task(_call(engine, "busy", 40))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceededError):
            await _call(engine, "late", 2, timeout_s=0.1)  # the only row is taken for 0.4 s
        await busy
        await engine.stop()
        return model, engine

    model, engine = asyncio.run(main())
    assert "late" not in model.joined and engine.admitted == 0


def test_queue_bound_and_stop_answer_running_rows():
    async def main():
        engine = await _started(SteppingModel(), max_queue=1)
        running = asyncio.create_task(_call(engine, "forever", 10_000))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            engine.admit()
        await engine.stop()
        return await asyncio.gather(running, return_exceptions=True)

    (err,) = asyncio.run(main())
    assert isinstance(err, APIError) and err.status == 503


def test_a_failing_worker_fails_its_rows_and_the_engine_serves_on():
    calls = []

    def flaky(feed):
        jobs = feed.take(feed.capacity)
        calls.append([j.payload[0] for j in jobs])
        if len(calls) == 1:
            raise RuntimeError("model crashed")
        for job in jobs:
            feed.finish(job, "ok")

    async def main():
        engine = await _started(flaky)
        first = await asyncio.gather(_call(engine, "a", 1), return_exceptions=True)
        second = await _call(engine, "b", 1)
        await engine.stop()
        return first, second

    (first,), (second, _) = asyncio.run(main())
    assert isinstance(first, RuntimeError) and second == "ok"
    assert calls == [["a"], ["b"]]
