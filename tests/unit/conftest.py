import pytest

from serve_api import make_server
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The OpenAI API over a real engine on a tiny Llama model, in-process (see tests/serve_api.py)."""
    api = make_server(tiny_model(tmp_path_factory.mktemp("served"), "llama-tiny"))
    yield api
    api.engine.shutdown()
