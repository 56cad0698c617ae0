"""A continuous-batching text generation engine over a Hugging Face causal LM; no Ray in here.

One background thread owns the model. Between decode steps it admits waiting requests: their prompts are
prefilled together (left-padded, one forward pass) and their key/value states copied into free rows of a
preallocated slot cache; finished sequences leave their row at once. Every decode step runs all running
sequences as one batch of one token each, so a short request never waits behind a long one.

The slot cache keeps every row's tokens right-aligned on a shared column cursor: a row holding ``L`` tokens
occupies columns ``[cursor - L, cursor)``, the columns before are masked out, and each step writes the new
token of every row at ``cursor``. Rows join by copying their prefill states in, leave by moving the last
row into the hole, and the columns are shifted only when the cursor reaches the end of the buffer. That
avoids what ``DynamicCache`` does at every step (concatenate, i.e. copy, the whole cache).

LoRA adapters are served from the same batch: with adapters the model is a ``PeftModel`` and every forward
pass gets a per-row ``adapter_names`` list (peft's mixed-adapter batches). Adapters are loaded on first use
and the least recently used one that no running sequence needs is evicted beyond ``max_loaded_adapters``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from llmforge.serve import content_filter
from llmforge.serve.fast_decode import FastDecoder, least_cost_ranges

log = logging.getLogger("llmforge.serve")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """More sequences would wait than ``max_waiting_sequences`` allows."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely tokens'
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first has none): echo=true


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text and log-probability (of the model's distribution, before temperature and
    top_p), and the ``k`` most likely tokens at that step as ``(text, logprob)``."""

    token: str
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Event:
    """What the engine tells a request's sink: new text of one choice, and its end."""

    index: int                      # the choice
    text: str                       # new text since the last event (may be empty)
    completion_tokens: int          # generated so far
    finish_reason: str | None = None  # "stop" | "length" | "content_filter" | "abort"
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the last event (when asked for)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens, on a choice's first event (when asked)


@dataclass(eq=False)
class Sequence:
    """One choice being generated."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Callable[[Event], None]
    generator: torch.Generator
    handle: "RequestHandle"
    output_ids: list[int] = field(default_factory=list)
    text: str = ""         # the output decoded so far, up to `read_offset` tokens
    prefix_offset: int = 0  # incremental decoding: tokens [prefix_offset, read_offset) give context to the next
    read_offset: int = 0
    emitted: int = 0       # characters of the output text already sent
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # generated since the last event, not yet sent
    prompt_logprobs: list[TokenLogprob] | None = None  # computed at prefill, sent with the first event


class RequestHandle:
    """Returned by :meth:`Engine.submit`; ``cancel()`` ends the request's sequences at the next step."""

    def __init__(self) -> None:
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class EngineSettings:
    max_batch_size: int = 32
    max_model_len: int = 2048
    max_waiting_sequences: int = 256  # sequences (a request's prompts x n), not requests
    max_loaded_adapters: int = 4
    blocked_terms: tuple[str, ...] = ()
    fast_decode: bool = True  # llmforge's decode step for Llama-family models (fast_decode.py) where it applies


class Metrics:
    """Hooks the serving layer turns into Prometheus metrics; no-ops here."""

    def on_step(self, batch_size: int, queued: int) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_finish(self, seconds: float, completion_tokens: int) -> None: ...


class _SlotState:
    def __init__(self, max_batch: int, max_len: int):
        self.max_batch, self.max_len = max_batch, max_len
        self.rows = 0        # running sequences occupy rows [0, rows)
        self.cursor = 0      # the column the next token of every row is written to
        self.first = 0       # no running row holds a column before this one: attention starts here (set by
                             # model_decode before the model's forward, which reads it in update/get_mask_sizes;
                             # llmforge's own decode step and prefill do not use it)


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every row; allocated on the first write (shapes come from the model)."""

    is_sliding = False

    def __init__(self, state: _SlotState):
        super().__init__()
        self.state = state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        s = self.state
        self.keys = key_states.new_zeros((s.max_batch, key_states.shape[1], s.max_len, key_states.shape[3]))
        self.values = value_states.new_zeros((s.max_batch, value_states.shape[1], s.max_len, value_states.shape[3]))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t, q, lo = key_states.shape[0], self.state.cursor, key_states.shape[2], self.state.first
        self.keys[:n, :, t:t + q] = key_states
        self.values[:n, :, t:t + q] = value_states
        return self.keys[:n, :, lo:t + q], self.values[:n, :, lo:t + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Columns [first, cursor + q): the mask's column k is column first + k of the 2D attention mask.
        return self.state.cursor + query_length - self.state.first, self.state.first

    def get_seq_length(self) -> int:
        return self.state.cursor

    def get_max_length(self) -> int:
        return self.state.max_len


class SlotCache(Cache):
    """The running batch's KV cache: fixed rows and columns, rows moved and columns shifted in place."""

    def __init__(self, num_layers: int, max_batch: int, max_len: int):
        self.state = _SlotState(max_batch, max_len)
        super().__init__(layers=[_SlotLayer(self.state) for _ in range(num_layers)])

    def _tensors(self):
        for layer in self.layers:
            if layer.is_initialized:
                yield layer.keys
                yield layer.values

    def insert(self, row: int, prefill: DynamicCache, src_row: int, length: int) -> None:
        """Copy the last ``length`` columns of ``prefill``'s row ``src_row`` to ``row``, ending at the cursor."""
        t = self.state.cursor
        for layer, src in zip(self.layers, prefill.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(src.keys, src.values)
            layer.keys[row, :, t - length:t] = src.keys[src_row, :, src.keys.shape[2] - length:]
            layer.values[row, :, t - length:t] = src.values[src_row, :, src.values.shape[2] - length:]

    def move_row(self, src: int, dst: int) -> None:
        t = self.state.cursor
        for buf in self._tensors():
            buf[dst, :, :t] = buf[src, :, :t]

    def shift(self, delta: int) -> None:
        """Move the occupied columns of the running rows by ``delta`` (right when positive)."""
        n, t = self.state.rows, self.state.cursor
        for buf in self._tensors():
            if delta > 0:
                buf[:n, :, delta:t + delta] = buf[:n, :, :t].clone()
            else:
                buf[:n, :, :t + delta] = buf[:n, :, -delta:t].clone()
        self.state.cursor = t + delta


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
    """Next token of each row: greedy at temperature 0, else nucleus sampling with the sequence's own generator.
    A row whose sampling fails gets None (that sequence ends with an error; the other rows go on)."""
    logits = logits.float()
    out: list[int | None] = logits.argmax(dim=-1).tolist()  # every greedy row at once; sampled rows overwritten
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        scaled = logits[row] / p.temperature
        if not torch.isfinite(scaled).all():
            continue  # a temperature so small that logits / T overflow: sampling at its limit is greedy
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            keep[0] = True  # the most likely token always stays (a top_p below float32's range compares as 0)
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        try:
            out[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
        except RuntimeError as exc:  # a distribution torch cannot sample from (NaN logits, say): this row only
            log.error("sampling failed for one sequence: %s", exc)
            out[row] = None
    return out


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int | None],
                   decode: Callable[[list[int]], str]) -> list[TokenLogprob | None]:
    """For the rows that ask for logprobs: the chosen token's log-probability and the top ``k`` (log-softmax of
    the raw logits, as vLLM and OpenAI report them)."""
    out: list[TokenLogprob | None] = [None] * len(seqs)
    for row, (seq, token) in enumerate(zip(seqs, tokens)):
        k = seq.params.logprobs
        if k is None or token is None:
            continue
        lp = torch.log_softmax(logits[row].float(), dim=-1)
        top = lp.topk(k) if k else None
        out[row] = TokenLogprob(decode([token]), float(lp[token]),
                                tuple((decode([int(t)]), float(v)) for v, t in zip(*top)) if top is not None else ())
    return out


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], k: int,
                          decode: Callable[[list[int]], str]) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (``logits``: the prefill's, one row per
    prompt position) and the top ``k`` there; the first token has none (OpenAI's ``echo`` with ``logprobs``)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    top = lp.topk(k, dim=-1) if k else None
    out = [TokenLogprob(decode([ids[0]]), None)]
    for j, token in enumerate(ids[1:]):
        alternatives = tuple((decode([int(t)]), float(v)) for v, t in zip(top.values[j], top.indices[j])) if top is not None else ()
        out.append(TokenLogprob(decode([token]), float(chosen[j]), alternatives))
    return out


def scan_output(text: str, emitted: int, stops: tuple[str, ...],
                folded_blocked: tuple[str, ...]) -> tuple[int | None, str | None, int]:
    """A sequence's text so far, of which ``text[:emitted]`` was sent: where it ends at a stop sequence or a
    blocked term (the index and ``"stop"`` / ``"content_filter"``; a stop wins a tie), and how much of it is
    final, safe to send (what could still begin a stop or a term is held back). Stops match exactly, as the
    client wrote them; blocked terms match folded (content_filter). The search starts a term's length before
    ``emitted``: what was sent had been checked, and held back while it could begin one."""
    start = max(0, emitted - max(map(len, stops + folded_blocked), default=0))
    tail = text[start:]
    found = [(at, "stop") for at in (tail.find(term) for term in stops) if at >= 0]
    blocked_at, blocked_held = content_filter.scan(tail, folded_blocked)
    if blocked_at is not None:
        found.append((blocked_at, "content_filter"))
    if found:
        at, reason = min(found, key=lambda hit: (hit[0], hit[1] != "stop"))
        return start + at, reason, start + at
    held = max(content_filter.prefix_at_end(tail, stops), blocked_held)
    return None, None, len(text) - held


class AdapterSet:
    """Named LoRA adapter dirs, loaded into the model on first use and evicted least recently used first."""

    def __init__(self, paths: dict[str, str], max_loaded: int):
        self.paths = paths
        self.max_loaded = max_loaded
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()

    def ensure(self, model, name: str, in_use: set[str]):
        """The model with adapter ``name`` loaded, or None when every loaded adapter is in use and none can go."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return model
        if len(self.loaded) >= self.max_loaded:
            idle = [a for a in self.loaded if a not in in_use]
            if not idle:
                return None
            model.delete_adapter(idle[0])
            del self.loaded[idle[0]]
            log.info("evicted adapter %s", idle[0])
        from peft import PeftModel

        started = time.perf_counter()
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, self.paths[name], adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(self.paths[name], adapter_name=name, is_trainable=False)
            # peft checks its active adapter on every forward; an evicted one must not stay active. Which rows
            # use which adapter is decided per batch by `adapter_names`.
            model.set_adapter(name)
        self.loaded[name] = None
        log.info("loaded adapter %s from %s in %.2fs", name, self.paths[name], time.perf_counter() - started)
        return model


def prefill_groups(lengths: list[int], pass_cost: int) -> list[list[int]]:
    """Split prompts to prefill into left-padded batches: indices into ``lengths``, grouped by length.

    One batch pads every prompt to the longest; a batch per prompt pays the fixed cost of a forward pass each
    time. ``pass_cost`` is that fixed cost in prompt tokens; the split minimizes passes x ``pass_cost`` + padded
    tokens, exactly, over the prompts sorted by length (:func:`least_cost_ranges`)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[a:b] for a, b in least_cost_ranges([lengths[i] for i in order], pass_cost)]


def model_decode(model, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache, starts: list[int],
                 **kwargs) -> torch.Tensor:
    """One decode step through the model's own forward: logits ``(rows, vocab)`` for one new token per row
    (``ids`` and ``positions`` are ``(rows,)``), its keys and values written at the cache's cursor; row ``r``
    attends to columns ``[starts[r], cursor]``. ``kwargs`` go to the forward (peft's ``adapter_names``)."""
    state = cache.state
    t = state.cursor
    # Attention reads only the columns some running row holds: after long sequences leave, the cursor can be far
    # right of the oldest running row's first column, and those masked columns would cost as much as real ones.
    state.first = min(starts)
    mask = (torch.arange(t + 1)[None, :] >= torch.tensor(starts)[:, None]).long()
    out = model(input_ids=ids[:, None], attention_mask=mask.to(ids.device), position_ids=positions[:, None],
                past_key_values=cache, use_cache=True, **kwargs)
    return out.logits[:, -1]


def check_request(settings: EngineSettings, adapters, prompt_ids: list[int], params: SamplingParams,
                  adapter: str | None) -> None:
    """KeyError for an adapter that is not served, ValueError for a request that cannot fit the context."""
    if adapter is not None and adapter not in adapters:
        raise KeyError(adapter)
    if len(prompt_ids) + params.max_tokens > settings.max_model_len or not prompt_ids:
        raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} do not fit the "
                         f"context of {settings.max_model_len} tokens")


class Engine:
    """Owns the model; ``submit`` from any thread, events come back through each request's sink."""

    def __init__(self, model, tokenizer, settings: EngineSettings, adapters: dict[str, str] | None = None,
                 metrics: Metrics | None = None, after_step: Callable[[], None] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # The Rust tokenizer directly: the Python wrapper's decode costs more than the decoding itself.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = (lambda ids: backend.decode(ids, skip_special_tokens=True)) if backend is not None else \
            (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.settings = settings
        self.adapters = AdapterSet(dict(adapters or {}), settings.max_loaded_adapters)
        self.metrics = metrics or Metrics()
        # Called on the engine thread after every step's events (and after a prefill's first tokens).
        self.after_step = after_step or (lambda: None)
        self.device = next(model.parameters()).device
        # A prefill pass's fixed cost in padded prompt tokens (see prefill_groups): on CPU a forward pass costs
        # about what 50 more prompt tokens do; on a GPU padding within a batch is nearly free.
        self.prefill_pass_tokens = 64 if self.device.type == "cpu" else 4096
        config = model.config
        self.cache = SlotCache(config.num_hidden_layers, settings.max_batch_size, settings.max_model_len)
        self.fast = None
        if settings.fast_decode:
            self.fast = FastDecoder.build(model, settings.max_model_len, settings.max_batch_size)
        self.running: list[Sequence] = []
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.stop_token_ids = self._stop_token_ids(model, tokenizer)
        self.blocked = content_filter.fold_terms(settings.blocked_terms)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.stop_token_ids))
        self.tokens_generated = 0
        self.requests_finished = 0
        self._lock = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._seed_source = itertools.count(int(time.time_ns() % 2**31))
        self._thread = threading.Thread(target=self._run, name="llmforge-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _stop_token_ids(model, tokenizer) -> set[int]:
        ids = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        if end_of_turn is not None:
            ids.add(end_of_turn)
        return ids

    # ---- the caller's side -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None], n: int = 1,
               adapter: str | None = None) -> RequestHandle:
        """Queue ``n`` choices for one prompt. Raises QueueFull or EngineStopped instead of queueing."""
        check_request(self.settings, self.adapters.paths, prompt_ids, params, adapter)
        handle = RequestHandle()
        seqs = []
        for i in range(n):
            seed = params.seed + i if params.seed is not None else next(self._seed_source)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            seqs.append(Sequence(i, list(prompt_ids), params, adapter, sink, gen, handle))
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            # Sequences beyond the free rows wait (queued ones not yet admitted take those rows first).
            queued = sum(map(len, self.waiting))
            free = max(0, self.settings.max_batch_size - len(self.running))
            if queued + n - free > self.settings.max_waiting_sequences:
                raise QueueFull(f"{max(0, queued - free)} sequences are already waiting")
            self.waiting.append(seqs)
            self._lock.notify()
        return handle

    @property
    def alive(self) -> bool:
        """Whether the generation thread is running (a replica without it can answer nothing)."""
        return self._thread.is_alive()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": sum(map(len, self.waiting)), "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished, "adapters_loaded": list(self.adapters.loaded)}

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let the ones in flight finish (up to ``drain_timeout`` s), then stop."""
        with self._lock:
            self._accepting = False
        deadline = time.time() + drain_timeout
        while (self.running or self.waiting) and time.time() < deadline and self.alive:
            time.sleep(0.05)
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.running and not self.waiting and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    break
            try:
                with torch.inference_mode():
                    if self._admit():
                        self.after_step()  # their first tokens go out now, not a decode step later
                    if self.running:
                        self._decode_step()
            except Exception as exc:  # a failed forward pass must not leave requests hanging
                log.exception("generation step failed")
                for seq in self.running + [s for group in self.waiting for s in group]:
                    self._finish(seq, "abort", error=str(exc))
                self.running.clear()
                self.waiting.clear()
                self.cache.state.rows = self.cache.state.cursor = 0
            self.after_step()
        for seq in self.running + [s for group in self.waiting for s in group]:
            self._finish(seq, "abort")
        self.after_step()

    def _take_admissible(self) -> list[Sequence]:
        room = self.settings.max_batch_size - len(self.running)
        admitted: list[Sequence] = []
        with self._lock:
            while self.waiting and len(self.waiting[0]) <= room - len(admitted):
                group = self.waiting[0]
                if group[0].handle.cancelled:
                    self.waiting.popleft()
                    for seq in group:
                        self._finish(seq, "abort")
                    continue
                adapter = group[0].adapter
                if adapter is not None:
                    in_use = {s.adapter for s in self.running + admitted if s.adapter}
                    try:
                        model = self.adapters.ensure(self.model, adapter, in_use)
                    except Exception as exc:  # this adapter's requests fail, nobody else's
                        log.exception("could not load adapter %s", adapter)
                        for seq in self.waiting.popleft():
                            self._finish(seq, "abort", error=f"adapter {adapter} could not be loaded: {exc}")
                        continue
                    if model is None:
                        break  # every loaded adapter is busy: wait for a sequence to finish
                    self.model = model
                admitted.extend(self.waiting.popleft())
        return admitted

    def _adapter_kwargs(self, seqs: list[Sequence]) -> dict:
        if not self.adapters.loaded:
            return {}
        return {"adapter_names": [s.adapter or BASE_ADAPTER for s in seqs]}

    def _admit(self) -> bool:
        """Prefill what can join the batch; whether anything did."""
        new = self._take_admissible()
        for group in prefill_groups([len(s.prompt_ids) for s in new], self.prefill_pass_tokens):
            batch = [new[i] for i in group]
            try:
                self._prefill(batch)
            except Exception:
                # Taken off the queue but not running yet: retried one by one, so only a sequence whose own
                # prefill fails ends (with an error), and the rest of the batch, and everyone running, go on.
                log.exception("prefill of %d sequence(s) failed; retrying them one by one", len(batch))
                for seq in batch:
                    if seq.finished or seq in self.running:
                        continue
                    if seq.output_ids:  # its first token went out before the batch failed: not prefilled twice
                        self._finish(seq, "abort", error="the prefill failed after its first token")
                        continue
                    try:
                        self._prefill([seq])
                    except Exception as exc:
                        self._finish(seq, "abort", error=str(exc))
        return bool(new)

    def _prefill(self, new: list[Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in new]
        width = max(lengths)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, seq in enumerate(new):
            ids[i, width - lengths[i]:] = torch.tensor(seq.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = DynamicCache()
        # The prompt's own log-probabilities need every position's logits (logits_to_keep=0), only then.
        scored = [i for i, seq in enumerate(new) if seq.params.prompt_logprobs is not None]
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=prefill, use_cache=True,
                         logits_to_keep=0 if scored else 1, **self._adapter_kwargs(new))
        for i in scored:
            new[i].prompt_logprobs = prompt_token_logprobs(out.logits[i, width - lengths[i]:], new[i].prompt_ids,
                                                           new[i].params.prompt_logprobs, self._decode)
        tokens = sample(out.logits[:, -1], new)
        logprobs = token_logprobs(out.logits[:, -1], new, tokens, self._decode)
        now = time.perf_counter()
        joining = []
        for i, (seq, token) in enumerate(zip(new, tokens)):
            if seq.handle.first_token_at is None:
                seq.handle.first_token_at = now
                self.metrics.on_first_token(now - seq.handle.submitted)
            if not self._append(seq, token, logprobs[i]):
                joining.append((i, seq))
        if joining:
            self._join(prefill, joining, lengths)

    def _join(self, prefill: DynamicCache, joining: list[tuple[int, Sequence]], lengths: list[int]) -> None:
        state = self.cache.state
        if not self.running:
            state.rows = state.cursor = 0
        need = max(lengths[i] for i, _ in joining)
        if state.cursor < need:
            self.cache.shift(need - state.cursor)
        for i, seq in joining:
            row = state.rows
            self.cache.insert(row, prefill, i, lengths[i])
            self.running.append(seq)
            state.rows += 1

    def _row_starts(self) -> list[int]:
        t = self.cache.state.cursor
        return [t - (len(s.prompt_ids) + len(s.output_ids) - 1) for s in self.running]

    def _decode_step(self) -> None:
        state = self.cache.state
        if state.cursor >= state.max_len:
            held = max(len(s.prompt_ids) + len(s.output_ids) - 1 for s in self.running)
            self.cache.shift(held - state.cursor)
        n, t = len(self.running), state.cursor
        starts = self._row_starts()  # the first column each running row holds
        ids = torch.tensor([s.output_ids[-1] for s in self.running], dtype=torch.long, device=self.device)
        positions = torch.tensor([t - s for s in starts], dtype=torch.long, device=self.device)
        if self.fast is not None and not self.adapters.loaded:  # adapters wrap the projections: peft's forward
            logits = self.fast(ids, positions, self.cache, starts)
        else:
            logits = model_decode(self.model, ids, positions, self.cache, starts, **self._adapter_kwargs(self.running))
        state.cursor = t + 1
        tokens = sample(logits, self.running)
        logprobs = token_logprobs(logits, self.running, tokens, self._decode)
        self.metrics.on_step(n, len(self.waiting))
        done = [row for row, (seq, token, lp) in enumerate(zip(self.running, tokens, logprobs))
                if self._append(seq, token, lp)]
        for row in sorted(done, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self.cache.move_row(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
            state.rows -= 1

    def _detokenize(self, seq: Sequence, final: bool = False) -> str:
        """The output text so far, decoding only the tokens since the last clean cut (plus the few before it, for
        tokenizers whose pieces depend on their left neighbour): decoding the whole output at every step made
        the text cost grow with its length. A trailing U+FFFD may be half of a multi-byte character that the
        next token completes: it is left out (unless the sequence ends here) and the cut does not move past it.
        Only the last one can change, as UTF-8 resynchronizes at every character start."""
        ids = seq.output_ids
        prefix = self._decode(ids[seq.prefix_offset:seq.read_offset])
        full = self._decode(ids[seq.prefix_offset:])
        new = full[len(prefix):]
        if final or not new.endswith("\ufffd"):
            if new:
                seq.text += new
                seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return seq.text
        return seq.text + new[:-1]

    def _append(self, seq: Sequence, token: int | None, logprob: TokenLogprob | None = None) -> bool:
        """Add one generated token, send what text is final; True when the sequence is done."""
        if token is None:  # its sampling failed (see sample): this sequence ends, the batch goes on
            self._finish(seq, "abort", error="sampling failed")
            return True
        self.tokens_generated += 1
        if seq.handle.cancelled:
            self._finish(seq, "abort")
            return True
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if token in self.stop_token_ids:
            self._finish(seq, "stop", seq.text)  # text held back for a stop sequence that never came is sent
            return True
        last = len(seq.output_ids) >= seq.params.max_tokens
        text = self._detokenize(seq, final=last)
        cut, reason, final = scan_output(text, seq.emitted, seq.params.stop, self.blocked)
        if cut is not None:
            self._finish(seq, reason, text[:cut])
            return True
        if last:
            self._finish(seq, "length", text)
            return True
        if final > seq.emitted:
            seq.sink(Event(seq.index, text[seq.emitted:final], len(seq.output_ids), logprobs=self._take_logprobs(seq),
                           prompt_logprobs=self._take_prompt_logprobs(seq)))
            seq.emitted = final
        return False

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        if not seq.logprobs:
            return None
        taken, seq.logprobs = seq.logprobs, []
        return taken

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        taken, seq.prompt_logprobs = seq.prompt_logprobs, None
        return taken

    def _finish(self, seq: Sequence, reason: str, text: str | None = None, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        rest = text[seq.emitted:] if text is not None and len(text) > seq.emitted else ""
        seq.sink(Event(seq.index, rest, len(seq.output_ids), reason, logprobs=self._take_logprobs(seq),
                       prompt_logprobs=self._take_prompt_logprobs(seq)))
        if seq.index == 0:
            self.requests_finished += 1
            self.metrics.on_finish(time.perf_counter() - seq.handle.submitted, len(seq.output_ids))


def load_model(model_dir: Path, dtype: str = "auto", quantize: str = "none", device: str | None = None):
    """The model and tokenizer of an exported HF dir, ready for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if quantize == "int8":
        model = quantize_int8(model)
    return model.eval(), tokenizer


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear layer but the output head (CPU inference): weights are stored
    in int8 and activations quantized per batch. The head stays in float, where most of the quality is lost."""
    from torch.ao.quantization import quantize_dynamic

    head = model.get_output_embeddings()
    layers = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head}
    return quantize_dynamic(model, layers, dtype=torch.qint8)
