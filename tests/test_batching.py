"""The batching engine with small fake batched functions: coalescing, waits, bounds, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mmstack.serve.batching import BatchingEngine, Job
from mmstack.serve.config import BatchingConfig
from mmstack.serve.errors import APIError, ClientDisconnectedError, DeadlineExceededError, QueueFullError


class FakeModel:
    """Doubles numbers in batches and records every batch it ran (and in which thread)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, jobs: list[Job]) -> list:
        self.batches.append([j.payload for j in jobs])
        self.threads.add(threading.current_thread().name)
        if any(j.payload == "bad" for j in jobs):
            raise ValueError("cannot double 'bad'")
        time.sleep(self.delay_s)
        return [j.payload * 2 for j in jobs]


def run(coro):
    return asyncio.run(coro)


async def _started(fn, **cfg) -> BatchingEngine:
    engine = BatchingEngine("fake", fn, BatchingConfig(**cfg))
    await engine.start()
    return engine


async def _call(engine: BatchingEngine, payload, op: str = "default", delay: float = 0.0):
    await asyncio.sleep(delay)
    with engine.admit() as ticket:
        return await ticket.submit(payload, op=op).result()


def test_concurrent_requests_share_batches_and_get_their_own_results():
    async def main():
        model = FakeModel(delay_s=0.01)
        engine = await _started(model, max_batch_size=4, max_wait_ms=200)
        results = await asyncio.gather(*(_call(engine, i) for i in range(10)))
        await engine.stop()
        return model, results, engine

    model, results, engine = run(main())
    assert results == [2 * i for i in range(10)]
    assert sorted(len(b) for b in model.batches) == [2, 4, 4]  # 10 requests -> 3 forward passes
    assert sorted(x for b in model.batches for x in b) == list(range(10))
    assert all(name.startswith("batch-fake") for name in model.threads)  # never on the event loop
    assert engine.admitted == 0


def test_batch_waits_at_most_max_wait_and_leaves_early_when_full():
    async def timed(max_batch: int, n: int, max_wait_ms: float) -> float:
        engine = await _started(FakeModel(), max_batch_size=max_batch, max_wait_ms=max_wait_ms)
        t0 = time.perf_counter()
        await asyncio.gather(*(_call(engine, i) for i in range(n)))
        await engine.stop()
        return time.perf_counter() - t0

    alone = run(timed(max_batch=8, n=1, max_wait_ms=3000))
    full = run(timed(max_batch=2, n=2, max_wait_ms=3000))
    assert alone < 1.5  # nobody else is admitted: no reason to wait (it would take 3 s)
    assert full < 1.5  # a full batch does not wait


def test_batch_waits_for_admitted_requests_still_preparing_but_only_max_wait():
    async def main(submit_after_s: float):
        model = FakeModel()
        engine = await _started(model, max_batch_size=8, max_wait_ms=300)
        preparing = engine.admit()  # admitted, still decoding its image (say)

        async def first() -> tuple[int, float]:
            return await _call(engine, 1), time.perf_counter()

        async def late() -> int:
            await asyncio.sleep(submit_after_s)
            with preparing:
                return await preparing.submit(2).result()

        t0 = time.perf_counter()
        (one, t1), two = await asyncio.gather(first(), late())
        await engine.stop()
        return model.batches, t1 - t0, [one, two]

    batches, latency, results = run(main(submit_after_s=0.1))
    assert batches == [[1, 2]] and results == [2, 4] and 0.1 <= latency < 1.0  # waited for its company
    batches, latency, results = run(main(submit_after_s=0.6))
    assert batches == [[1], [2]] and results == [2, 4] and 0.29 <= latency < 0.6  # ... but only max_wait


def test_operations_are_not_mixed_in_one_batch():
    async def main():
        model = FakeModel()
        engine = await _started(model, max_batch_size=8, max_wait_ms=100)
        out = await asyncio.gather(*(_call(engine, i, op="a" if i % 2 else "b") for i in range(6)))
        await engine.stop()
        return model, out

    model, out = run(main())
    assert out == [0, 2, 4, 6, 8, 10]
    assert sorted(sorted(b) for b in model.batches) == [[0, 2, 4], [1, 3, 5]]


def test_queue_full_is_refused_at_once_with_retry_after():
    async def main():
        engine = await _started(FakeModel(), max_queue=2)
        first = engine.admit(2)
        with pytest.raises(QueueFullError) as err:
            engine.admit()
        assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
        with pytest.raises(APIError, match="at most 2 items"):
            engine.admit(3)  # can never fit: a plain 400, not "retry later"
        first.release()
        first.release()  # idempotent
        assert engine.admitted == 0
        result = await _call(engine, 21)
        await engine.stop()
        return result

    assert run(main()) == 42


def test_deadline_while_running_and_while_queued():
    async def main():
        model = FakeModel(delay_s=0.4)
        engine = await _started(model, max_batch_size=1, max_wait_ms=0, timeout_s=0.15)
        running = asyncio.create_task(_call(engine, 1))
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(_call(engine, 2))  # waits behind the slow batch past its deadline
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        await asyncio.sleep(0.5)  # let the worker finish the first batch and look at the queue
        await engine.stop()
        return model, outcomes, engine

    model, outcomes, engine = run(main())
    assert all(isinstance(o, DeadlineExceededError) and o.status == 504 for o in outcomes)
    assert model.batches == [[1]]  # the expired job never reached the model
    assert engine.admitted == 0


def test_one_failing_item_fails_only_its_own_request():
    async def main():
        model = FakeModel()
        engine = await _started(model, max_batch_size=8, max_wait_ms=100)
        out = await asyncio.gather(*(_call(engine, p) for p in [1, "bad", 3]), return_exceptions=True)
        await engine.stop()
        return model, out

    model, out = run(main())
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], ValueError) and "bad" in str(out[1])
    assert len(model.batches[0]) == 3  # they did share a batch before the retry one by one


def test_per_item_exceptions_returned_by_run_batch():
    def run_batch(jobs):
        return [ValueError("odd") if j.payload % 2 else j.payload for j in jobs]

    async def main():
        engine = await _started(run_batch, max_wait_ms=50)
        out = await asyncio.gather(*(_call(engine, i) for i in range(4)), return_exceptions=True)
        await engine.stop()
        return out

    out = run(main())
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and isinstance(out[3], ValueError)


def test_disconnect_mid_stream_frees_the_slot_and_stops_the_work():
    steps = []

    def streaming(jobs):
        for step in range(200):
            live = [j for j in jobs if j.active]
            if not live:
                break
            steps.append(step)
            for j in live:
                j.emit(f"{j.payload}-{step}")
            time.sleep(0.01)
        return ["done" for _ in jobs]

    async def main():
        engine = await _started(streaming, max_queue=1, max_wait_ms=0)
        gone = False

        async def disconnected() -> bool:
            return gone

        ticket = engine.admit()
        job = ticket.submit("a", stream=True)
        got = []
        with pytest.raises(ClientDisconnectedError):
            async for chunk in job.stream(disconnected):
                got.append(chunk)
                if len(got) == 3:
                    gone = True
        ticket.release()
        assert engine.admitted == 0
        # The slot is free again: a new request is admitted and served while the old batch winds down.
        with engine.admit() as t2:
            chunks = [c async for c in t2.submit("b", stream=True).stream()]
        await engine.stop()
        return got, chunks

    got, chunks = run(main())
    assert got[:3] == ["a-0", "a-1", "a-2"] and len(got) < 20  # noticed within a poll interval
    assert chunks[:2] == ["b-0", "b-1"] and len(chunks) == 200
    assert len(steps) < 250  # the first stream stopped early instead of running its 200 steps


def test_streaming_job_result_after_chunks():
    def streaming(jobs):
        for j in jobs:
            for k in range(3):
                j.emit(k)
        return [{"n": 3} for _ in jobs]

    async def main():
        engine = await _started(streaming, max_wait_ms=0)
        with engine.admit() as ticket:
            job = ticket.submit(None, stream=True)
            chunks = [c async for c in job.stream()]
            final = await job.result()
        await engine.stop()
        return chunks, final

    assert run(main()) == ([0, 1, 2], {"n": 3})


def test_queue_gauges_read_the_engine_when_scraped():
    from mmstack.serve.metrics import ServeMetrics

    def gauges(metrics: ServeMetrics) -> tuple[float, float]:
        text = metrics.render().decode()
        read = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "fake" in line}
        return read["mmstack_queue_depth"], read["mmstack_in_flight"]

    async def main():
        metrics = ServeMetrics()
        release = threading.Event()
        engine = BatchingEngine(
            "fake", lambda jobs: [release.wait(5) for _ in jobs], BatchingConfig(max_batch_size=1), metrics
        )
        await engine.start()
        assert gauges(metrics) == (0, 0)
        tickets = [engine.admit() for _ in range(3)]
        jobs = [t.submit(i) for i, t in enumerate(tickets)]
        await asyncio.sleep(0.1)  # the first job blocks in the model, two wait
        busy = gauges(metrics)
        release.set()
        await asyncio.gather(*(j.result() for j in jobs))
        for t in tickets:
            t.release()
        await engine.stop()
        return busy, gauges(metrics)

    busy, idle = run(main())
    assert busy == (2, 3) and idle == (0, 0)


def test_watch_disconnect_keeps_one_receive_pending_and_sees_the_client_leave():
    from mmstack.serve.batching import watch_disconnect

    async def main():
        gone, calls = asyncio.Event(), []

        async def receive() -> dict:
            calls.append(1)
            await gone.wait()
            return {"type": "http.disconnect"}

        check = watch_disconnect(receive)
        before = [await check() for _ in range(5)]
        gone.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before, await check(), len(calls)

    before, after, calls = run(main())
    assert before == [False] * 5 and after is True
    assert calls == 1  # five checks, one receive


def test_a_job_is_dropped_when_its_watched_client_leaves():
    from mmstack.serve.batching import watch_disconnect

    async def main():
        release, gone = threading.Event(), asyncio.Event()

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        engine = await _started(lambda jobs: [release.wait(5) for _ in jobs], max_batch_size=1)
        with engine.admit() as first, engine.admit() as second:
            first.submit("busy")  # holds the model
            waiting = second.submit("waits")
            asyncio.get_running_loop().call_later(0.1, gone.set)
            with pytest.raises(ClientDisconnectedError):
                await waiting.result(watch_disconnect(receive))
            release.set()
        await engine.stop()

    run(main())
