"""The decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3), written against the slot cache.

A decode step of a small model on CPU is a few dozen small operations per layer; through the transformers
forward each one also pays for module calls, keyword plumbing, the 4D mask built from the 2D one and the
cache's update protocol. This step uses the same weights (the model's own modules, nothing copied) with the
same arithmetic, and does two things the generic path cannot:

- attention reads each row's own columns only, per group of rows: the slot cache keeps rows right-aligned on
  a shared cursor, so one attention call over the whole batch reads every row back to the oldest row's first
  column. Decode attention is memory-bound (a step reads every key and value it attends to), so the masked
  columns cost as much as real ones. The rows are split into contiguous ranges, each attending from its own
  oldest row (:func:`attention_groups`), when the columns saved outweigh the cost of another call.
- one additive float mask per group, built once per step for every layer (SDPA turns a boolean mask into a
  float one on every call).
- on CPU, the linear layers' weights packed once into MKL's GEMM layout (:class:`PackedLinears`): a plain
  float32 matmul repacks its weight on every call, which for the few rows of a decode step costs about a
  fifth of the step's linear time. A packed weight serves one row count only, so a step with more than half
  that many rows runs padded to it; smaller steps use the plain weights.

It is used only where it computes exactly what the model's forward would: a model class listed in
``SUPPORTED`` whose projections are plain ``nn.Linear`` (no LoRA adapters loaded, no int8 quantization), with
rotary embeddings over the whole head and no sliding window shorter than the context. Anything else decodes
through the model's own forward. Prefill always does.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("llmforge.serve")

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# What another attention call costs, in row-columns read: a call is about 10 us on CPU, where one key and
# value column of one row (all heads) is about 0.2 us for a 4x64 head layout. Groups are formed only where
# they save more than this. On a GPU a kernel launch costs more and bandwidth is plentiful.
CALL_COST_CPU = 50
CALL_COST_GPU = 4096


def least_cost_ranges(widths: list[int], fixed_cost: int) -> list[tuple[int, int]]:
    """Split items ``0..len(widths)`` into contiguous ranges ``(start, stop)`` for batched passes.

    A pass over a range costs ``fixed_cost`` plus its items times the widest of them (every item is padded or
    windowed to that width). Minimizes the total, exactly: dynamic programming over the ``n (n + 1) / 2``
    ranges, ``n`` being a batch (32 or so). On equal costs the fewer, larger ranges win. The engine's prefill
    batches (prompt lengths, sorted) and the decode step's attention groups (each row's window) both use it."""
    n = len(widths)
    best = [0] * (n + 1)  # best[j]: least cost of the first j items; cut[j]: where their last range starts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        widest = 0
        best[j] = -1
        for i in range(j - 1, -1, -1):
            widest = max(widest, widths[i])
            cost = best[i] + fixed_cost + (j - i) * widest
            if best[j] < 0 or cost <= best[j]:
                best[j], cut[j] = cost, i
    ranges, j = [], n
    while j:
        ranges.append((cut[j], j))
        j = cut[j]
    return ranges[::-1]


def attention_groups(starts: list[int], end: int, call_cost: int) -> list[tuple[int, int, int]]:
    """Split rows ``0..len(starts)`` into contiguous ranges ``(first_row, stop_row, first_column)``.

    Row ``r`` attends to columns ``[starts[r], end)``; a range reads ``rows x (end - its smallest start)``
    columns. Minimizes the columns read plus ``call_cost`` per range (:func:`least_cost_ranges`)."""
    return [(a, b, min(starts[a:b])) for a, b in least_cost_ranges([end - s for s in starts], call_cost)]


class FastDecoder:
    """One decode step of a supported model over a :class:`~llmforge.serve.engine.SlotCache`."""

    def __init__(self, model, packed: "PackedLinears | None" = None):
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = model.lm_head
        self.layers = list(inner.layers)
        self.call_cost = CALL_COST_CPU if model.lm_head.weight.device.type == "cpu" else CALL_COST_GPU
        self.packed = packed

    @classmethod
    def build(cls, model, max_model_len: int, max_batch_size: int = 32) -> "FastDecoder | None":
        """The fast step for ``model``, or None (with the reason logged) where it would not be exact."""
        reason = cls.unsupported(model, max_model_len)
        if reason:
            log.info("decode step: the model's own forward (%s)", reason)
            return None
        packed, why = PackedLinears.build(model, max_batch_size)
        log.info("decode step: llmforge's Llama-family step with per-group attention windows; %s",
                 f"weights packed for {packed.rows} rows" if packed else f"plain weights ({why})")
        return cls(model, packed)

    @staticmethod
    def unsupported(model, max_model_len: int) -> str | None:
        name = type(model).__name__
        if name not in SUPPORTED:
            return f"{name} is not one of {', '.join(SUPPORTED)}"
        config = model.config
        if type(model.lm_head) is not torch.nn.Linear:
            return f"the output head is a {type(model.lm_head).__name__}"
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if type(proj) is not torch.nn.Linear:
                    return f"a projection is a {type(proj).__name__} (quantized or adapted)"
            window = getattr(attn, "sliding_window", None)
            if name == "MistralForCausalLM":
                window = getattr(config, "sliding_window", None)
            if window is not None and window < max_model_len:
                return f"sliding-window attention ({window} < max_model_len {max_model_len})"
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
            return "rotary embeddings over part of the head"
        return None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache, starts: list[int]) -> torch.Tensor:
        """Logits ``(rows, vocab)`` of one new token per row. ``ids`` and ``positions`` are ``(rows,)``; each
        row's key and value are written at ``cache.state.cursor``; row ``r`` attends to columns
        ``[starts[r], cursor]``."""
        n, t = ids.shape[0], cache.state.cursor
        end = t + 1
        packed = self.packed if self.packed is not None and self.packed.rows // 2 < n <= self.packed.rows else None
        if packed is not None and n < packed.rows:  # padding rows: token 0 at position 0, never written nor read
            pad = packed.rows - n
            ids = torch.cat((ids, ids.new_zeros(pad)))
            positions = torch.cat((positions, positions.new_zeros(pad)))
        linear = packed if packed is not None else _plain
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions[:, None])  # (rows, 1, head_dim): broadcasts over heads
        groups = []
        for a, b, lo in attention_groups(starts, end, self.call_cost):
            mask = None
            if any(s > lo for s in starts[a:b]):  # rows shorter than the group's oldest: mask their columns out
                row_starts = torch.tensor(starts[a:b], device=x.device)
                columns = torch.arange(lo, end, device=x.device)
                mask = torch.zeros((b - a, 1, 1, end - lo), dtype=x.dtype, device=x.device)
                mask.masked_fill_((columns[None, :] < row_starts[:, None])[:, None, None, :], float("-inf"))
            groups.append((a, b, lo, mask))
        rows = x.shape[0]
        for layer, cache_layer in zip(self.layers, cache.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            d = attn.head_dim
            q = linear(attn.q_proj, h).view(rows, -1, d)
            k = linear(attn.k_proj, h).view(rows, -1, d)
            v = linear(attn.v_proj, h).view(rows, -1, d)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache_layer.keys[:n, :, t] = k[:n]
            cache_layer.values[:n, :, t] = v[:n]
            q = q.unsqueeze(2)  # (rows, heads, 1, head_dim)
            gqa = q.shape[1] != k.shape[1]
            outs = [F.scaled_dot_product_attention(q[a:b], cache_layer.keys[a:b, :, lo:end],
                                                   cache_layer.values[a:b, :, lo:end], attn_mask=mask,
                                                   scale=attn.scaling, enable_gqa=gqa)
                    for a, b, lo, mask in groups]
            if rows > n:
                outs.append(q.new_zeros((rows - n,) + q.shape[1:]))
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + linear(attn.o_proj, o.reshape(rows, -1))
            h = layer.post_attention_layernorm(x)
            x = x + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        logits = linear(self.head, self.norm(x))
        return logits[:n] if rows > n else logits


def _plain(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class PackedLinears:
    """The model's linear weights (every projection and the output head) packed into MKL's GEMM layout for
    ``rows`` input rows: calling it as ``packed(module, x)`` with ``x`` of exactly ``rows`` rows gives what
    ``module(x)`` does without repacking the weight. A copy of the weights, so only where it is small
    (``MAX_BYTES``) and, the packing being for CPU float32 matmuls, only there."""

    MAX_BYTES = 1 << 30
    MAX_ROWS = 64  # a step pads to `rows`: beyond this, padding a half-full batch costs more than packing saves

    def __init__(self, modules: list[torch.nn.Linear], rows: int):
        self.rows = rows
        self._packed = {id(m): torch.ops.mkl._mkl_reorder_linear_weight(m.weight, rows) for m in modules}

    @classmethod
    def build(cls, model, max_batch_size: int) -> "tuple[PackedLinears | None, str]":
        head = model.lm_head
        modules = [head] + [m for layer in model.model.layers for m in
                            (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                             layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        weight = head.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return None, f"{weight.device.type} {weight.dtype}"
        if not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
            return None, "torch has no MKL"
        size = sum(m.weight.numel() * m.weight.element_size() for m in modules)
        if size > cls.MAX_BYTES:
            return None, f"a packed copy would take {size / 2**30:.1f} GiB"
        if max_batch_size < 2 or max_batch_size > cls.MAX_ROWS:
            return None, f"batch of {max_batch_size} rows"
        return cls(modules, max_batch_size), ""

    def __call__(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self._packed[id(module)], module.weight, module.bias, self.rows)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
