"""An in-process OpenAI API over a real engine on a tiny model (no Ray, no sockets), for the serving tests."""

import asyncio

import httpx
import pytest

from llmforge.serve.openai_api import build_api

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_server(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmforge.serve.engine import Engine, EngineSettings
    from llmforge.serve.openai_api import ModelServer
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=128, blocked_terms=("secret",)))
    return ModelServer(engine=engine, tokenizer=tok, model_name="m", adapters=[], max_model_len=128,
                       default_max_tokens=8, max_body_bytes=4 * 1_048_576, api_key=KEY, blocked_terms=("secret",),
                       body_read_timeout_s=5.0)


def call(server, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=build_api(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The OpenAI API over a real engine on a tiny Llama model, in-process; import it into a test module."""
    from tiny_models import tiny_model
    api = make_server(tiny_model(tmp_path_factory.mktemp("served"), "llama-tiny"))
    yield api
    api.engine.shutdown()
