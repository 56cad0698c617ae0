"""`jobs/serve.py` as a user runs it: blocks, answers, and on Ctrl-C lets the request in flight finish.

Runs after test_serve.py has shut its Serve instance down (Serve is one per cluster), on the session's cluster."""

import json
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from conftest import REPO, free_port, stop
from tiny_models import tiny_model

pytestmark = pytest.mark.integration


def test_serve_job_answers_and_drains_on_sigint(ray_cluster, tmp_path):
    import ray
    model = tiny_model(tmp_path / "model", "llama-tiny", context=512)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--model", str(model), "--port", str(port),
                             f"--ray.address={ray.get_runtime_context().gcs_address}", "--serve.num_cpus=0.5"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**__import__("os").environ, "LLMFORGE_API_KEY": "job-key"})
    try:
        deadline = time.time() + 120
        while "READY" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="job-key", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "model"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()

        result, started = {}, threading.Event()

        def long_stream():
            arrivals, finish = [], []
            for chunk in client.completions.create(model="model", prompt="Debian is", max_tokens=480, temperature=0,
                                                   stream=True):
                arrivals.append(time.time())
                started.set()
                finish += [c.finish_reason for c in chunk.choices if c.finish_reason]
            result.update(arrivals=arrivals, finish=finish)  # the client stops at `data: [DONE]`, else raises
        t = threading.Thread(target=long_stream)
        t.start()
        # SIGINT once the stream is under way: a fixed wait raced the generation, which now can end within a second
        assert started.wait(60), "the stream did not start"
        interrupted = time.time()
        proc.send_signal(signal.SIGINT)
        t.join(120)
        assert result["finish"] in (["length"], ["stop"]), "the request in flight should have finished normally"
        assert result["arrivals"][-1] > interrupted + 0.2, "the stream should still have been running at SIGINT"
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        summary = json.loads(log.read_text().strip().splitlines()[-1])
        assert summary["event"] == "serve_stopped" and summary["model"] == "model"
    finally:
        stop(proc)


def test_serve_job_refuses_bad_input_before_starting(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    for args, expected in (([], "No model given"), (["--model", str(not_a_model)], "no config.json"),
                           (["--model", str(not_a_model), "--adapter", "broken"], "is not NAME=DIR")):
        out = subprocess.run([sys.executable, str(REPO / "jobs" / "serve.py"), *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr


def test_build_app_for_serve_run_and_rayservice(tmp_path):
    """`serve run llmforge.serve.app:build_app model=...` and RayService args build the configured deployment."""
    from llmforge.serve.app import build_app
    model = tiny_model(tmp_path / "m", "llama-tiny")
    app = build_app({"model": str(model), "serve.max_batch_size": "8", "serve.autoscaling.max_replicas": "3",
                     "serve.num_cpus": "2"})
    deployment = app._bound_deployment
    assert deployment.name == "LLMServer" and deployment.ray_actor_options["num_cpus"] == 2
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert app._bound_deployment.init_args[0]["max_batch_size"] == 8
    from llmforge.errors import InputError
    with pytest.raises(InputError, match="no config.json"):
        build_app({"model": str(tmp_path)})
