"""llmforge's Llama-family decode step against the model's own forward over the same slot cache."""

import itertools

import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV3Config, DynamicCache, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

from llmforge.serve import fast_decode
from llmforge.serve.engine import SlotCache, model_decode, quantize_int8
from llmforge.serve.fast_decode import FastDecoder, PackedLinears, attention_groups

MKL = torch.backends.mkl.is_available()

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)

CONFIGS = {
    # grouped-query attention, biases on every projection
    "llama-gqa-bias": LlamaConfig(**SHAPE, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "llama-tied": LlamaConfig(**SHAPE, num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2": Qwen2Config(**SHAPE, num_key_value_heads=2),          # q/k/v biases
    "qwen3": Qwen3Config(**SHAPE, num_key_value_heads=2, head_dim=16),  # q/k RMSNorm per head
    "mistral": MistralConfig(**SHAPE, num_key_value_heads=1, sliding_window=None),
}


def build(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random biases and norm weights, so that leaving one out shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.2)
    return model


def filled_cache(model, prompts, cursor):
    """A slot cache holding each prompt's prefill right-aligned on ``cursor``, as the engine's join does."""
    cache = SlotCache(model.config.num_hidden_layers, len(prompts) + 1, 64)
    cache.state.cursor = cursor
    for row, ids in enumerate(prompts):
        prefill = DynamicCache()
        model(input_ids=torch.tensor([ids]), past_key_values=prefill, use_cache=True)
        cache.insert(row, prefill, 0, len(ids))
    cache.state.rows = len(prompts)
    return cache


def packed_calls(monkeypatch) -> list[int]:
    """The row count of every linear call that goes through packed weights, from now on."""
    calls = []
    real_call = PackedLinears.__call__
    monkeypatch.setattr(PackedLinears, "__call__", lambda self, m, x: calls.append(x.shape[0]) or real_call(self, m, x))
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("call_cost", [0, 10**9])  # every row alone where that saves anything / one group
@pytest.mark.parametrize("pack_rows", [None, 5, 8], ids=["plain", "packed", "packed-padded"])
def test_fast_step_computes_what_the_models_forward_does(name, call_cost, pack_rows, monkeypatch):
    """Rows of different lengths, three steps in a row (each reads the columns the one before wrote): the same
    logits and the same cache contents as the model's forward, split into attention groups or not, with the
    plain weights, weights packed for exactly the 5 rows, and packed for 8 (the step padded to 8 rows)."""
    if pack_rows and not MKL:
        pytest.skip("torch is built without MKL")
    model = build(CONFIGS[name])
    assert FastDecoder.unsupported(model, 64) is None
    packed = PackedLinears.build(model, pack_rows)[0] if pack_rows else None
    calls = packed_calls(monkeypatch)
    fast = FastDecoder(model, packed)
    fast.call_cost = call_cost
    groups_used = []
    real_groups = fast_decode.attention_groups
    monkeypatch.setattr(fast_decode, "attention_groups", lambda *a: groups_used.append(real_groups(*a)) or groups_used[-1])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 17, 1, 9, 12)]
    cursor = 20
    reference, ours = filled_cache(model, prompts, cursor), filled_cache(model, prompts, cursor)
    ids = torch.randint(0, 96, (len(prompts),), generator=g)
    with torch.inference_mode():
        for _ in range(3):
            t = reference.state.cursor
            starts = [t - len(p) for p in prompts]
            positions = torch.tensor([len(p) for p in prompts])
            expected = model_decode(model, ids, positions, reference, starts)
            got = fast(ids, positions, ours, starts)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            for a, b in zip(reference.layers, ours.layers):
                torch.testing.assert_close(b.keys[:, :, :t + 1], a.keys[:, :, :t + 1])
                torch.testing.assert_close(b.values[:, :, :t + 1], a.values[:, :, :t + 1])
            for cache in (reference, ours):
                cache.state.cursor = t + 1
            prompts = [p + [int(i)] for p, i in zip(prompts, ids)]
            ids = expected.argmax(-1)
    assert max(map(len, groups_used)) == (1 if call_cost else len(prompts))
    if pack_rows:  # every projection and the head ran on the packed weights, with the padded row count
        assert set(calls) == {pack_rows} and len(calls) == 3 * (7 * model.config.num_hidden_layers + 1)
    else:
        assert calls == []


@pytest.mark.skipif(not MKL, reason="torch is built without MKL")
def test_packed_weights_only_where_they_pay(monkeypatch):
    """Packed for the engine's batch size on CPU float32; a step of half that many rows or fewer uses the
    plain weights (padding it would cost more than the packing saves); none for bfloat16 or huge batches."""
    model = build(CONFIGS["llama-gqa-bias"])
    packed, why = PackedLinears.build(model, 8)
    assert packed is not None and packed.rows == 8 and why == ""
    fast = FastDecoder(model, packed)
    calls = packed_calls(monkeypatch)
    cache = filled_cache(model, [[1, 2, 3], [4, 5]], 4)
    with torch.inference_mode():
        fast(torch.tensor([7, 8]), torch.tensor([3, 2]), cache, [1, 2])
    assert calls == []
    assert PackedLinears.build(model, PackedLinears.MAX_ROWS + 1)[0] is None
    assert PackedLinears.build(model.to(torch.bfloat16), 8) == (None, "cpu torch.bfloat16")


def test_attention_groups_are_the_least_cost_split():
    """Checked against every split into contiguous ranges."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 1 + trial % 7
        starts = torch.randint(0, 50, (n,), generator=g).tolist()
        end, call_cost = 60, [0, 5, 40, 1000][trial % 4]

        def cost(groups):
            return sum(call_cost + (b - a) * (end - lo) for a, b, lo in groups)

        groups = attention_groups(starts, end, call_cost)
        assert [a for a, _, _ in groups][0] == 0 and groups[-1][1] == n
        assert all(groups[i][1] == groups[i + 1][0] for i in range(len(groups) - 1))
        assert all(lo == min(starts[a:b]) for a, b, lo in groups)
        best = min(cost([(a, b, min(starts[a:b])) for a, b in zip((0,) + cuts, cuts + (n,))])
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert cost(groups) == best


def test_models_it_would_not_compute_exactly_use_their_own_forward(tmp_path):
    llama = build(CONFIGS["llama-tied"])
    assert FastDecoder.unsupported(llama, 64) is None
    assert "quantized or adapted" in FastDecoder.unsupported(quantize_int8(build(CONFIGS["llama-tied"])), 64)
    sliding = build(MistralConfig(**SHAPE, num_key_value_heads=1, sliding_window=16))
    assert "sliding-window" in FastDecoder.unsupported(sliding, 64)
    assert FastDecoder.unsupported(sliding, 16) is None  # a window as long as the context slides nowhere
    deepseek = build(DeepseekV3Config(**SHAPE, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                      n_group=1, topk_group=1))
    assert "DeepseekV3ForCausalLM is not one of" in FastDecoder.unsupported(deepseek, 64)
    assert FastDecoder.build(deepseek, 64) is None
