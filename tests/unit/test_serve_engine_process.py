"""The engine in its own process (what a Serve replica runs), against the in-process engine's results."""

import os
import signal
import threading

import pytest

from llmforge.serve.engine import EngineSettings, EngineStopped, QueueFull, SamplingParams
from llmforge.serve.engine_process import EngineProcess, EngineStartError
from test_serve_engine import Collector, greedy_reference
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("llama"), "llama-tiny")


def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), tok


def test_outputs_queue_limit_cancel_and_drain(model_dir):
    model, tok = _reference_model(model_dir)
    engine = EngineProcess(model_dir, EngineSettings(max_batch_size=2, max_model_len=64, max_waiting_sequences=1),
                           threads=1)
    assert engine.alive and engine.info["pid"] != os.getpid()
    ids = tok("Debian is")["input_ids"]
    # the same greedy text as `generate` in this process, for each of n choices
    c = Collector(2)
    engine.submit(ids, SamplingParams(max_tokens=10, temperature=0), c, n=2)
    c.wait()
    reference = greedy_reference(model, tok, "Debian is", 10)
    for i in range(2):
        assert c.reason[i] in ("length", "stop") and reference.startswith(c.text[i])
        assert c.reason[i] == "stop" or c.text[i] == reference
    # logprobs cross the process boundary with their tokens: one per generated token, the greedy one the likeliest
    events, ended = [], threading.Event()

    def sink(event):
        events.append(event)
        if event.finish_reason is not None:
            ended.set()
    engine.submit(ids, SamplingParams(max_tokens=4, temperature=0, logprobs=2), sink)
    assert ended.wait(60)
    logprobs = [lp for event in events for lp in event.logprobs or []]
    assert len(logprobs) == events[-1].completion_tokens >= 1
    assert all(len(lp.top) == 2 and abs(lp.top[0][1] - lp.logprob) < 1e-5 for lp in logprobs)
    # the queue limit is enforced on this side: 2 rows running, 1 waiting, the next is refused at once
    long = [Collector(), Collector()]
    handles = [engine.submit(ids, SamplingParams(max_tokens=50, temperature=0), x) for x in long]
    while engine.stats()["running"] < 2:
        threading.Event().wait(0.01)
    waiting = Collector()
    engine.submit(ids, SamplingParams(max_tokens=3, temperature=0), waiting)
    with pytest.raises(QueueFull):
        engine.submit(ids, SamplingParams(max_tokens=3, temperature=0), Collector())
    with pytest.raises(ValueError, match="context"):
        engine.submit(ids, SamplingParams(max_tokens=64), Collector())
    with pytest.raises(KeyError):
        engine.submit(ids, SamplingParams(max_tokens=3), Collector(), adapter="nope")
    handles[0].cancel()
    assert long[0].wait().reason == ["abort"]
    assert waiting.wait().reason[0] in ("length", "stop")
    # shutdown lets the request in flight finish, then refuses new ones
    last = Collector()
    engine.submit(ids, SamplingParams(max_tokens=20, temperature=0), last)
    engine.shutdown(drain_timeout=60)
    assert long[1].wait().reason[0] in ("length", "stop") and last.wait().reason[0] in ("length", "stop")
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit(ids, SamplingParams(max_tokens=3), Collector())


def test_cancel_reaches_every_choice_and_a_killed_engine_process_ends_its_requests(model_dir):
    engine = EngineProcess(model_dir, EngineSettings(max_batch_size=2, max_model_len=256), threads=1)
    c = Collector(2)
    handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=240, temperature=0), c, n=2)
    while engine.stats()["running"] == 0:
        threading.Event().wait(0.01)
    handle.cancel()
    # both choices end aborted (one that had already ended on its own would show "stop" and fewer tokens)
    assert c.wait().reason == ["abort", "abort"]
    c = Collector(2)
    engine.submit([5, 6, 7], SamplingParams(max_tokens=240, temperature=0), c, n=2)
    while engine.stats()["running"] == 0:
        threading.Event().wait(0.01)
    assert not c.done.is_set()
    os.kill(engine.info["pid"], signal.SIGKILL)
    assert c.wait().reason == ["abort", "abort"]
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit([5], SamplingParams(max_tokens=3), Collector())
    engine.shutdown(1)


def test_a_model_that_cannot_load_is_reported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(EngineStartError, match="could not load the model"):
        EngineProcess(tmp_path, EngineSettings(), threads=1)
