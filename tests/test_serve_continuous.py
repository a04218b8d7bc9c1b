"""Continuous batching for chat: requests join a running generation between decode steps and leave it
when done, and each one's answer is what the model gives for it alone."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from PIL import Image

from _serve_models import save_vlm
from mmstack.serve.errors import ClientDisconnectedError


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny VLM whose answers change with any position or mask mistake (large init scale)."""
    from mmstack.models.bridge import BridgeModel

    return BridgeModel.from_pretrained(save_vlm(tmp_path_factory.mktemp("vlm") / "vlm", init_range=0.5))


class FakeJob:
    """What the generation loop uses of a ``batching.Job``: payload, active, streaming, emit."""

    def __init__(self, payload, stream: bool = False) -> None:
        self.payload, self.streaming, self.cancelled = payload, stream, False
        self.chunks: list[str] = []

    @property
    def active(self) -> bool:
        return not self.cancelled

    def emit(self, chunk: str) -> None:
        self.chunks.append(chunk)


class ScriptedFeed:
    """Hands jobs to the loop at chosen steps (the n-th ``take``) and records answers and forward passes."""

    def __init__(self, schedule: dict[int, list[FakeJob]], capacity: int = 8, on_take=None) -> None:
        self.schedule, self.capacity, self.on_take = schedule, capacity, on_take
        self.stopping = False
        self.takes = 0
        self.results: dict[FakeJob, object] = {}
        self.passes: list[tuple[str, int]] = []

    def take(self, n: int) -> list[FakeJob]:
        if self.on_take:
            self.on_take(self.takes)
        jobs = self.schedule.pop(self.takes, [])
        assert len(jobs) <= n
        self.takes += 1
        return jobs

    def finish(self, job, outcome, seconds=None) -> None:
        assert job not in self.results, "a job was answered twice"
        self.results[job] = outcome

    def record(self, op: str, size: int, seconds: float) -> None:
        self.passes.append((op, size))


def _service(vlm):
    from mmstack.serve.chat import ChatService
    from mmstack.serve.config import load_serve_config

    return ChatService("vlm", vlm, load_serve_config({}))


def _turns(text: str, image: bool) -> list[dict]:
    return [{"from": "human", "value": text + ("\n<image>" if image else "")}]


def _job(svc, turns, image, max_tokens, ignore_eos=False, temperature=0.0, seed=None, stream=False) -> FakeJob:
    from mmstack.serve.chat import Sampling

    sampling = Sampling(temperature=temperature, seed=seed, ignore_eos=ignore_eos)
    return FakeJob(svc.prepare(turns, image, max_tokens, [], sampling), stream=stream)


def _alone(vlm, turns, image, max_tokens, ignore_eos=False, seed=None) -> str:
    """The answer of the model to this prompt alone, through ``bridge_generate`` (not the server)."""
    from mmstack.models.bridge_generate import GenerationConfig, generate, generate_text

    images = [image] if image is not None else None
    if not ignore_eos:
        cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=seed is not None, seed=seed)
        return generate_text(vlm, [turns], images=images, config=cfg)[0]
    proc = vlm.processor
    batch = proc.prompts([turns], images=images, padding_side="left")
    out = generate(vlm, **batch, max_new_tokens=max_tokens, eos_token_ids=[], pad_token_id=proc.pad_token_id)
    return proc.tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip()


def test_greedy_answers_are_the_same_alone_or_joining_a_running_batch(vlm):
    svc = _service(vlm)
    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    long_turns = [
        {"from": "human", "value": "what colour is the circle ?\n<image>"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the square left of the star ?"},
    ]
    cases = {  # name: (joins at step, turns, image, max_tokens, ignore_eos, seed)
        "a": (0, _turns("what colour is the circle ?", True), red, 14, True, None),
        "b": (3, _turns("yes", False), None, 4, True, None),  # short: leaves while a still runs
        "c": (5, long_turns, blue, 10, True, None),  # longer prompt than the running rows
        "d": (5, _turns("one two", False), None, 6, False, None),  # may stop at its end token
        "e": (2, _turns("what colour is the star ?", False), None, 6, False, 7),  # sampled with a seed
    }
    schedule: dict[int, list[FakeJob]] = {}
    jobs = {}
    for name, (step, turns, image, n, ignore_eos, seed) in cases.items():
        temperature = 1.0 if seed is not None else 0.0
        jobs[name] = _job(svc, turns, image, n, ignore_eos, temperature, seed, stream=name == "a")
        schedule.setdefault(step, []).append(jobs[name])
    feed = ScriptedFeed(schedule)
    svc.run_continuous(feed)

    assert set(feed.results) == set(jobs.values())
    for name, (_, turns, image, n, ignore_eos, seed) in cases.items():
        got = feed.results[jobs[name]]
        assert got.text == _alone(vlm, turns, image, n, ignore_eos, seed), name
        if ignore_eos:
            assert got.completion_tokens == n and got.finish_reason == "length"
    assert "".join(jobs["a"].chunks).strip() == feed.results[jobs["a"]].text  # streamed as it ran
    # Rows really joined a running batch: prefills at four different steps, decode steps of 3+ rows.
    assert [size for op, size in feed.passes if op == "prefill"] == [1, 1, 1, 2]
    assert max(size for op, size in feed.passes if op == "chat") >= 3


def test_a_bad_newcomer_fails_alone_and_a_cancelled_row_leaves(vlm):
    svc = _service(vlm)
    good = _job(svc, _turns("what colour is the circle ?", True), Image.new("RGB", (40, 40), "red"), 8, True)
    bad = _job(svc, _turns("what colour is the circle ?", True), Image.new("RGB", (40, 40), "red"), 8, True)
    bad.payload.views = None  # placeholders without an image: the model refuses this prompt
    leaver = _job(svc, _turns("yes", False), None, 50, True)

    def on_take(step: int) -> None:
        if step == 4:
            leaver.cancelled = True  # its client left: the row leaves at the next step

    feed = ScriptedFeed({0: [leaver], 2: [good, bad]}, on_take=on_take)
    svc.run_continuous(feed)
    assert "placeholder" in str(feed.results[bad])
    assert isinstance(feed.results[leaver], ClientDisconnectedError)
    want = _alone(vlm, _turns("what colour is the circle ?", True), Image.new("RGB", (40, 40), "red"), 8, True)
    assert feed.results[good].text == want
    assert sum(size for op, size in feed.passes if op == "chat") < 20  # the 50-token row did not run on


def test_finished_rows_give_back_their_cache_columns(vlm):
    from mmstack.serve.chat import Sampling
    from mmstack.serve.running_batch import RunningBatch

    svc = _service(vlm)
    red = Image.new("RGB", (40, 40), "red")
    long = svc.prepare(_turns("what colour is the circle ?", True), red, 4, [], Sampling())
    short = svc.prepare(_turns("yes", False), None, 4, [], Sampling())
    batch = RunningBatch(vlm)
    with torch.inference_mode():
        batch.add(batch.prefill(**svc._collate([long])))
        batch.add(batch.prefill(**svc._collate([short])))
        assert batch.mask.shape == (2, len(long.input_ids))
        assert int(batch.mask[1].sum()) == len(short.input_ids)
        batch.step(batch.logits.argmax(-1))
        batch.keep([1])
        assert batch.mask.shape == (1, len(short.input_ids) + 1) and bool(batch.mask.all())
        batch.step(batch.logits.argmax(-1))  # the cache drops the left row and its columns here
    width = len(short.input_ids) + 2
    assert batch.mask.shape == (1, width) and bool(batch.mask.all())
    assert all(layer.keys.shape == layer.values.shape == (1, 2, width, 16) for layer in batch.cache.layers)


def _live(models: dict, **batching):
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer

    cfg = load_serve_config({"batching": {"max_wait_ms": 0, **batching}, "generation": {"temperature": 0.0}})
    return LiveServer(create_app(cfg, models=models))


def test_a_short_request_is_answered_while_a_long_stream_runs(vlm):
    import httpx

    with _live({"vlm": vlm}) as server:
        svc = server.server.config.app.state.serve.services["vlm"]
        assert type(svc.engine).__name__ == "ContinuousBatchingEngine"
        slow = type(vlm).decode.__get__(vlm)
        vlm.decode = lambda *a: (time.sleep(0.03), slow(*a))[1]  # 60 steps: about 2 s
        try:
            long = {"model": "vlm", "messages": [{"role": "user", "content": "yes"}], "max_tokens": 60}
            long.update(stream=True, ignore_eos=True)
            streamed: list[str] = []

            def read_stream() -> None:
                with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=30) as r:
                    streamed.extend(r.iter_lines())

            reader = threading.Thread(target=read_stream)
            reader.start()
            _wait_for(lambda: svc.engine.admitted == 1)
            time.sleep(0.2)  # the long generation is under way
            short = {"model": "vlm", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 3}
            r = httpx.post(server.url + "/v1/chat/completions", json=short, timeout=30)
            still_running = reader.is_alive()
            reader.join(30)
        finally:
            del vlm.decode
    assert r.status_code == 200 and still_running  # answered without waiting for the long batch to end
    assert r.json()["choices"][0]["message"]["content"] == _alone(vlm, _turns("one two", False), None, 3)
    deltas = [json.loads(line[6:]) for line in streamed if line.startswith("data: {")]
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in deltas if d["choices"])
    assert text.strip() == _alone(vlm, _turns("yes", False), None, 60, ignore_eos=True)


def test_continuous_false_runs_whole_batches_with_the_same_answers(vlm):
    import httpx

    with _live({"vlm": vlm}, continuous=False) as server:
        svc = server.server.config.app.state.serve.services["vlm"]
        assert type(svc.engine).__name__ == "BatchingEngine"
        body = {"model": "vlm", "messages": [{"role": "user", "content": "what colour is the star ?"}]}
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=30)
    assert r.json()["choices"][0]["message"]["content"] == _alone(
        vlm, _turns("what colour is the star ?", False), None, 5
    )


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.01)
