"""Named model shapes ("flavors"), each a `transformers` config class plus its arguments.

DeepSeek-style presets use ``DeepseekV3Config``: MLA attention (low-rank compressed KV with a decoupled
RoPE part), MoE feed-forward with shared experts, the first layers dense. ``vocab_size`` and
``max_position_embeddings`` are filled in from the dataset's manifest.
"""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV3Config, LlamaConfig, PretrainedConfig, Qwen2Config

FAMILIES: dict[str, type[PretrainedConfig]] = {"deepseek_v3": DeepseekV3Config, "llama": LlamaConfig, "qwen2": Qwen2Config}

# ``topk_method``/``scoring_func`` are what vLLM's and SGLang's DeepseekV3 loaders read to build the router's
# correction bias (transformers' DeepseekV3 always routes that way: sigmoid scores plus the bias, no aux loss).
# MLA's latent is DeepSeek-V3's own: ``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 = 576, the one head size
# vLLM's MLA kernels take (CPU, AMX, sparse, and the GPU ones are tuned for it); see MLA_GEOMETRY.
MLA_GEOMETRY = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}
_DEEPSEEK_COMMON = {"n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
                    "tie_word_embeddings": False, "rope_interleave": True,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                    **MLA_GEOMETRY}

PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in minutes.
    "deepseek-tiny": {"family": "deepseek_v3", **_DEEPSEEK_COMMON,
                      "hidden_size": 128, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                      "num_attention_heads": 4, "num_key_value_heads": 4,
                      "q_lora_rank": 64, "qk_nope_head_dim": 16,
                      "v_head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64,
                      "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "deepseek-125m": {"family": "deepseek_v3", **_DEEPSEEK_COMMON,
                      "hidden_size": 640, "num_hidden_layers": 12, "first_k_dense_replace": 1,
                      "num_attention_heads": 10, "num_key_value_heads": 10,
                      "q_lora_rank": 320, "qk_nope_head_dim": 32,
                      "v_head_dim": 64, "intermediate_size": 1792, "moe_intermediate_size": 320,
                      "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "deepseek-1b": {"family": "deepseek_v3", **_DEEPSEEK_COMMON,
                    "hidden_size": 1280, "num_hidden_layers": 16, "first_k_dense_replace": 1,
                    "num_attention_heads": 16, "num_key_value_heads": 16,
                    "q_lora_rank": 640, "qk_nope_head_dim": 64,
                    "v_head_dim": 96, "intermediate_size": 4096, "moe_intermediate_size": 704,
                    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 2},
    "llama-tiny": {"family": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 384, "tie_word_embeddings": False},
    "llama-125m": {"family": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 12, "intermediate_size": 2048, "tie_word_embeddings": True},
    "llama-1b": {"family": "llama", "hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "intermediate_size": 5632, "tie_word_embeddings": True},
    "qwen2-tiny": {"family": "qwen2", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 384, "tie_word_embeddings": True},
    "qwen2-125m": {"family": "qwen2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 2, "intermediate_size": 2048, "tie_word_embeddings": True},
}
