"""The serving app on a real local Ray cluster, behind Ray Serve's HTTP proxy on 127.0.0.1, called with the
official `openai` client."""

import concurrent.futures
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import free_port
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789"
MAX_BODY = 65_536


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tiny_model(tmp_path_factory.mktemp("served"), "llama-tiny", context=256)
    adapters = {name: tiny_adapter(base, tmp_path_factory.mktemp(name), seed) for name, seed in (("support", 1), ("legal", 2))}
    return base, adapters


@pytest.fixture(scope="module")
def served(ray_cluster, model_dirs):
    """The main app at / (autoscaling 1-2 replicas on a low target) and a one-slot app at /tight for backpressure."""
    from ray import serve

    from llmforge.config import load_config
    from llmforge.serve.app import build_deployment

    base, adapters = model_dirs
    port = free_port()
    cfg = load_config(None, {
        "serve.model": str(base), "serve.model_name": "tiny", "serve.adapters": {k: str(v) for k, v in adapters.items()},
        "serve.num_cpus": 0.5, "serve.max_batch_size": 16, "serve.max_body_bytes": MAX_BODY,
        "serve.blocked_terms": ["forbidden-word"], "serve.default_max_tokens": 32,
        "serve.stream_interval_s": 0,  # every token as it comes: a tiny model's 20 tokens fit in one 0.1 s interval
        "serve.autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                              "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5}})
    tight = cfg.serve.model_copy(update={"adapters": {}, "autoscaling": cfg.serve.autoscaling.model_copy(update={"max_replicas": 1}),
                                         "num_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 1})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_deployment(cfg.serve, KEY), name="llmforge", route_prefix="/")
        serve.run(build_deployment(tight, KEY), name="tight", route_prefix="/tight")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def client(url, key=KEY, prefix=""):
    return openai.OpenAI(base_url=f"{url}{prefix}/v1", api_key=key, max_retries=0, timeout=60)


def reference(model_dirs, prompt, max_new, adapter=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, adapters = model_dirs
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapters[adapter])
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.eval().generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_models_completions_and_chat(served, model_dirs):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["tiny", "legal", "support"]
    done = c.completions.create(model="tiny", prompt="Debian is", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.choices[0].text == reference(model_dirs, "Debian is", 12)
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "How do I install nginx?"}],
                                     max_tokens=10, temperature=0.9, seed=5, n=2)
    assert chat.object == "chat.completion" and len(chat.choices) == 2
    assert all(ch.message.role == "assistant" and ch.finish_reason in ("length", "stop") for ch in chat.choices)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "How do I install nginx?"}],
                                      max_tokens=10, temperature=0.9, seed=5, n=2)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]  # seed
    stopped = c.completions.create(model="tiny", prompt="Debian is", max_tokens=12, temperature=0,
                                   stop=[done.choices[0].text[3:5]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == done.choices[0].text[:3]


def test_lm_eval_through_the_proxy_scores_as_in_process(served, model_dirs, monkeypatch):
    """lm-eval's local-completions through Ray Serve's proxy (echo + logprobs, token-id prompts in batches of 8)
    gives the in-process scores (within 1e-4: float32 on both sides, batched differently)."""
    from llmforge.evals import harness
    monkeypatch.setenv("LLMFORGE_API_KEY", KEY)
    base, _ = model_dirs
    tasks = ["handbook_ending_en", "handbook_ending_zh", "handbook_lastword_en"]
    local = harness.evaluate(str(base), tasks, limit=12)["results"]
    remote = harness.evaluate(str(base), tasks, endpoint=f"{served}/v1", served_model="tiny", limit=12)["results"]
    assert set(remote) == set(tasks)
    for task in tasks:
        for metric, value in local[task].items():
            assert remote[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_streaming_chat(served):
    c = client(served)
    messages = [{"role": "user", "content": "Debian 是什么？"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content) >= 3, "tokens should arrive in several chunks"
    assert "".join(content) == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_adapter_selection(served, model_dirs):
    c = client(served)
    outs = {m: c.completions.create(model=m, prompt="Debian is", max_tokens=12, temperature=0).choices[0].text
            for m in ("tiny", "support", "legal")}
    assert len(set(outs.values())) == 3
    assert outs["support"] == reference(model_dirs, "Debian is", 12, adapter="support")
    assert outs["legal"] == reference(model_dirs, "Debian is", 12, adapter="legal")


def test_error_cases(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"bogus_param": 1})
    assert err.value.body["param"] == "bogus_param"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="hi", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="apt install " * 300, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="Debian is", max_tokens=1000)
    assert err.value.code == "context_length_exceeded" and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say FORBIDDEN-WORD now"}])
    assert err.value.code == "content_filter"
    with pytest.raises(openai.AuthenticationError) as err:
        client(served, key="sk-wrong").models.list()
    assert err.value.code == "invalid_api_key"
    assert httpx.get(f"{served}/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="no-such-model", prompt="hi")
    assert err.value.code == "model_not_found" and "tiny" in err.value.message
    with pytest.raises(openai.APIStatusError) as err:
        c.completions.create(model="tiny", prompt="x" * (MAX_BODY + 10))
    assert err.value.status_code == 413
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{served}/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("The request body is not valid JSON")
    r = httpx.post(f"{served}/v1/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    assert httpx.get(f"{served}/health").json()["status"] == "ok"
    # serve.engine=auto on CPU replicas serving a Llama model: llmforge's engine, and /health (with the key) says why
    health = httpx.get(f"{served}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["engine"] == "llmforge" and health["engine_reason"].startswith("auto: ")


def test_backpressure_gives_503_with_retry_after(served):
    c = client(served, prefix="/tight")

    def call(_):
        try:
            c.completions.create(model="tiny", prompt="Debian is", max_tokens=200, temperature=0)
            return 200, None
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers.get("retry-after")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    assert (200, None) in results
    rejected = [r for r in results if r[0] == 503]
    assert rejected and all(retry == "1" for _, retry in rejected)


def test_many_concurrent_requests_all_answered(served):
    c = client(served)
    prompts = [f"Request {i}: how do I install package {i}?" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=16 + len(p) % 7,
                                                                temperature=0), prompts))
    assert len(results) == 24 and all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    alone = c.completions.create(model="tiny", prompt=prompts[5], max_tokens=16 + len(prompts[5]) % 7, temperature=0)
    assert results[5].choices[0].text == alone.choices[0].text  # batching changes nothing


def test_stream_survives_garbage_from_another_client(served):
    c = client(served)
    result = {}

    def stream():
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=60, temperature=0, stream=True))
        result["finish"] = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        result["chunks"] = len(chunks)
    t = threading.Thread(target=stream)
    t.start()
    host, port = served.removeprefix("http://").split(":")
    for payload in (b"\x00\xff garbage \r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n{",
                    b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            try:
                s.recv(1024)
            except OSError:
                pass
    auth = {"Authorization": f"Bearer {KEY}"}
    codes = [httpx.post(f"{served}/v1/chat/completions", content=body, headers=auth).status_code
             for body in (b"\x89PNG\r\n", b'{"model": "tiny", "messages": "nope"}', b"[]")]
    assert codes == [400, 400, 400]
    t.join(60)
    assert result["finish"] in (["length"], ["stop"]) and result["chunks"] > 3


def _replicas(app="llmforge"):
    from ray import serve
    return serve.status().applications[app].deployments["LLMServer"].replica_states.get("RUNNING", 0)


def test_replicas_scale_up_under_load_and_back_down(served):
    c = client(served)
    assert _replicas() == 1
    stop = threading.Event()

    def load():
        while not stop.is_set():
            c.completions.create(model="tiny", prompt="Debian is", max_tokens=100, temperature=0.7)
    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 90
        while _replicas() < 2 and time.time() < deadline:
            time.sleep(0.5)
        peak = _replicas()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert peak == 2
    deadline = time.time() + 90
    while _replicas() > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _replicas() == 1
