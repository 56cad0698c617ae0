"""serve.engine=vllm: the exports vLLM loads (its greedy tokens equal transformers', fp32 on CPU, for every model
family and a LoRA adapter), and the live app (Ray Serve LLM's LLMServer running vLLM behind llmforge's API) on a
local Ray cluster, behind Serve's proxy on 127.0.0.1, called with the official `openai` client.

vLLM comes from `make vllm` (`make test` installs it first). Without it these tests skip, except under CI=true,
where they fail: CI must never pass without having run them."""

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import free_port
from tiny_models import tiny_adapter, tiny_model

from llmforge.serve import vllm_engine

pytestmark = pytest.mark.integration

if (why := vllm_engine.missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"{why}: the vLLM tests cannot run. `make test` installs vLLM first (make vllm).")
    pytest.skip(f"{why}: run `make vllm` to run these tests", allow_module_level=True)

KEY = "sk-vllm-test"
HERE = Path(__file__).resolve().parents[1]
PROMPTS = ["How do I install nginx?", "Debian is a", "安装软件包"]


def greedy_transformers(model_dir: Path, prompts: list[list[int]], max_tokens: int, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            ids_t = torch.tensor([ids])
            for _ in range(max_tokens):  # no eos stop: the same fixed length vLLM gives with ignore_eos
                ids_t = torch.cat([ids_t, model(input_ids=ids_t).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out.append(ids_t[0, len(ids):].tolist())
    return out


def test_exports_of_every_family_generate_the_same_greedy_tokens_in_vllm_as_in_transformers(tmp_path):
    from transformers import AutoTokenizer
    runs, expected = [], []
    for preset in ("deepseek-tiny", "llama-tiny", "qwen2-tiny"):
        model = tiny_model(tmp_path / preset, preset)
        tok = AutoTokenizer.from_pretrained(model)
        prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
        runs.append({"model": str(model), "prompts": prompts, "max_tokens": 12})
        expected.append(greedy_transformers(model, prompts, 12))
        if preset == "llama-tiny":  # and a LoRA adapter through vLLM's multi-LoRA
            adapter = tiny_adapter(model, tmp_path / "adapter", seed=3)
            runs.append({"model": str(model), "adapter": str(adapter), "prompts": prompts, "max_tokens": 12})
            expected.append(greedy_transformers(model, prompts, 12, adapter))
    config = json.loads((tmp_path / "deepseek-tiny" / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["topk_method"]) == (512, 64, "noaux_tc")
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"runs": runs}))
    done = subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), str(job), str(out)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(out.read_text())
    names = ["deepseek-tiny", "llama-tiny", "llama-tiny + LoRA", "qwen2-tiny"]
    for name, want, have in zip(names, expected, got):
        assert have == want, f"{name}: vLLM {have} != transformers {want}"
    assert expected[2] != expected[1], "the adapter changes nothing: the LoRA parity would prove nothing"


# ---- the live app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tiny_model(tmp_path_factory.mktemp("vllm-served"), "llama-tiny", context=256)
    return base, tiny_adapter(base, tmp_path_factory.mktemp("support"), seed=1)


@pytest.fixture(scope="module")
def served(ray_cluster, models):
    from ray import serve

    from llmforge.config import load_config
    from llmforge.serve.app import build_deployment

    base, adapter = models
    port = free_port()
    cfg = load_config(None, {
        "serve.model": str(base), "serve.model_name": "tiny", "serve.engine": "vllm",
        "serve.adapters": {"support": str(adapter)}, "serve.num_cpus": 1, "serve.max_batch_size": 16,
        "serve.default_max_tokens": 16, "serve.stream_interval_s": 0, "serve.blocked_terms": ["forbidden-word"]})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_deployment(cfg.serve, KEY), name="llmforge-vllm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_health_and_models(served):
    health = httpx.get(f"{served}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert health["engine"] == "vllm" and health["engine_reason"] == "serve.engine=vllm"
    assert [m.id for m in client(served).models.list()] == ["tiny", "support"]


def test_completion_with_logprobs_is_transformers_greedy(served, models):
    from transformers import AutoTokenizer
    base, _ = models
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.encode("Debian is a", add_special_tokens=False)
    response = client(served).completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    choice = response.choices[0]
    want = greedy_transformers(base, [ids], 6)[0]
    if tok.eos_token_id in want:  # the server stops at end of text, as it should
        want = want[:want.index(tok.eos_token_id)]
    assert choice.text == tok.decode(want, skip_special_tokens=True)
    assert response.usage.completion_tokens == len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs)
    assert all(lp <= 0 and len(top) <= 2 for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(served, models):
    """What lm-eval's local-completions asks of the vLLM replica for a loglikelihood: the prompt's own tokens'
    log-probabilities (vLLM's prompt_logprobs), in OpenAI's echo shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, _ = models
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.encode("Debian is a free operating system", add_special_tokens=False)
    choice = client(served).completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                               echo=True).choices[0]
    with torch.no_grad():
        lsm = torch.log_softmax(AutoModelForCausalLM.from_pretrained(base)(input_ids=torch.tensor([ids])).logits[0], -1)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.tokens[0] == tok.decode(ids[:1], skip_special_tokens=True)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(lsm[j, ids[j + 1]]) for j in range(len(ids) - 1)],
                                                          abs=1e-3)
    assert choice.text.startswith(tok.decode(ids, skip_special_tokens=True))


def test_chat_and_streaming(served):
    c = client(served)
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    whole = c.completions.create(model="tiny", prompt="How do I", max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt="How do I", max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_lora_adapter_is_selected_by_name(served):
    c = client(served)
    base = c.completions.create(model="tiny", prompt="Debian is a", max_tokens=10, temperature=0).choices[0].text
    tuned = c.completions.create(model="support", prompt="Debian is a", max_tokens=10, temperature=0).choices[0].text
    assert tuned != base
    health = httpx.get(f"{served}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert health["adapters_loaded"] == ["support"]


def test_errors_have_openai_shapes(served):
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        client(served).completions.create(model="nope", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client(served).completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client(served).completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert too_long.value.body["code"] == "context_length_exceeded"


def test_many_concurrent_requests_are_all_answered(served):
    c = client(served)

    def one(i):
        response = c.completions.create(model="support" if i % 3 == 0 else "tiny", prompt=f"request {i}",
                                        max_tokens=8, temperature=0.7, seed=i)
        return response.choices[0].finish_reason, response.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(48)))
    assert len(answers) == 48 and all(reason in ("stop", "length") and 1 <= n <= 8 for reason, n in answers)
