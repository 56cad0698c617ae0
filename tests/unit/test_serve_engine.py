"""The continuous-batching engine against `model.generate`, with no Ray and no HTTP."""

import contextlib
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmforge.serve.content_filter import prefix_at_end
from llmforge.serve.engine import Engine, EngineSettings, QueueFull, SamplingParams, sample
from tiny_models import tiny_adapter, tiny_model

PROMPTS = ["How do I", "Debian is a free operating system", "安装", "Run sudo apt install nginx. How do I install", "x",
           "The quick brown fox"]


@pytest.fixture(scope="module", params=["llama-tiny", "deepseek-tiny"])
def model_dir(request, tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


class Collector:
    """Gathers one request's events (any number of choices)."""

    def __init__(self, n: int = 1):
        self.text = [""] * n
        self.reason = [None] * n
        self.tokens = [0] * n
        self.chunks = [[] for _ in range(n)]
        self.done = threading.Event()
        self._left = n

    def __call__(self, event):
        self.text[event.index] += event.text
        self.chunks[event.index].append(event.text)
        self.tokens[event.index] = event.completion_tokens
        if event.finish_reason:
            self.reason[event.index] = event.finish_reason
            self._left -= 1
            if not self._left:
                self.done.set()

    def wait(self):
        assert self.done.wait(60), "request did not finish"
        return self


def greedy_reference(model, tok, prompt, max_new):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def run(engine, tok, prompt, **params):
    c = Collector(params.pop("n", 1))
    engine.submit(tok(prompt)["input_ids"], SamplingParams(**params), c, n=len(c.text))
    return c.wait()


def test_continuous_batching_matches_sequential_generate(loaded):
    """Staggered arrivals, more requests than batch rows and a context small enough that the slot cache has to
    shift its columns: every greedy output is still exactly what `generate` gives for that prompt alone.
    The first five arrive together (4 rows: the fifth waits for a row), so the batch never empties before the
    cursor passes the 40 columns (at least 18 + 16 steps after prompts of 4+ tokens) and the columns must be
    compacted whatever the machine's speed; the last one arrives a little later. The Llama model decodes through
    llmforge's own step (fast_decode), the DeepSeek one through the model's forward."""
    model, tok = loaded
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=40))
    assert (engine.fast is not None) == (model.config.model_type == "llama")
    engine.stop_token_ids = set()  # random weights: compare fixed-length outputs
    shifts = []
    original_shift = engine.cache.shift
    engine.cache.shift = lambda delta: (shifts.append(delta), original_shift(delta))
    try:
        collectors = []
        for i, prompt in enumerate(PROMPTS):
            c = Collector()
            engine.submit(tok(prompt)["input_ids"], SamplingParams(max_tokens=24 - 2 * i, temperature=0), c)
            collectors.append((prompt, 24 - 2 * i, c))
            if i == len(PROMPTS) - 2:
                threading.Event().wait(0.05)
        for prompt, max_new, c in collectors:
            c.wait()
            assert c.reason == ["length"] and c.tokens == [max_new]
            assert c.text[0] == greedy_reference(model, tok, prompt, max_new)
        assert any(d < 0 for d in shifts), "the test should have made the cache compact its columns"
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    finally:
        engine.shutdown()


def test_seed_makes_sampling_reproducible(loaded):
    model, tok = loaded
    engine = Engine(model, tok, EngineSettings(max_batch_size=8, max_model_len=64))
    engine.stop_token_ids = set()
    try:
        a = run(engine, tok, "Debian is", max_tokens=16, temperature=1.0, seed=7).text
        b = run(engine, tok, "Debian is", max_tokens=16, temperature=1.0, seed=7).text
        c = run(engine, tok, "Debian is", max_tokens=16, temperature=1.0, seed=8).text
        assert a == b and a != c
        # n choices of one seeded request are different from each other, and reproducible as a whole
        n1 = run(engine, tok, "Debian is", max_tokens=16, temperature=1.0, seed=3, n=3).text
        n2 = run(engine, tok, "Debian is", max_tokens=16, temperature=1.0, seed=3, n=3).text
        assert n1 == n2 and len(set(n1)) == 3
        # a tiny nucleus leaves only the most likely token: sampling becomes greedy
        assert run(engine, tok, "Debian is", max_tokens=12, temperature=1.0, top_p=1e-6).text == \
            run(engine, tok, "Debian is", max_tokens=12, temperature=0).text
    finally:
        engine.shutdown()


def test_stop_sequences_and_content_filter_cut_the_output(loaded):
    model, tok = loaded
    full = greedy_reference(model, tok, "How do I", 30)
    # a piece of the greedy output that first occurs after its start: the output must end just before it
    cut = next(k for k in range(2, len(full) - 2) if full[k:k + 2].strip() and full.lower().find(full[k:k + 2].lower()) == k)
    word = full[cut:cut + 2]
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=64, blocked_terms=(word.upper(),)))
    engine.stop_token_ids = set()
    try:
        c = run(engine, tok, "How do I", max_tokens=30, temperature=0)
        assert c.reason == ["content_filter"] and c.text[0] == full[:cut]
        assert word.lower() not in "".join(c.chunks[0]).lower()
    finally:
        engine.shutdown()
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=64))
    engine.stop_token_ids = set()
    try:
        c = run(engine, tok, "How do I", max_tokens=30, temperature=0, stop=(word, "never-there"))
        assert c.reason == ["stop"] and c.text[0] == full[:cut]
        assert all(word not in chunk for chunk in c.chunks[0])
    finally:
        engine.shutdown()


def test_queue_limit_cancel_and_context_guard(loaded):
    model, tok = loaded
    engine = Engine(model, tok, EngineSettings(max_batch_size=1, max_model_len=64, max_waiting_sequences=1))
    engine.stop_token_ids = set()
    try:
        ids = tok("Debian is")["input_ids"]
        first, second = Collector(), Collector()
        h1 = engine.submit(ids, SamplingParams(max_tokens=60 - len(ids), temperature=0), first)
        while engine.stats()["running"] == 0:
            threading.Event().wait(0.005)
        engine.submit(ids, SamplingParams(max_tokens=4, temperature=0), second)
        with pytest.raises(QueueFull):
            engine.submit(ids, SamplingParams(max_tokens=4, temperature=0), Collector())
        h1.cancel()
        assert first.wait().reason == ["abort"] and first.tokens[0] < 60 - len(ids)
        assert second.wait().reason == ["length"]
        with pytest.raises(ValueError, match="context"):
            engine.submit(ids, SamplingParams(max_tokens=64), Collector())
    finally:
        engine.shutdown()


def test_held_back_is_the_longest_suffix_that_starts_a_term():
    assert prefix_at_end("hello wor", ("world",)) == 3
    assert prefix_at_end("hello", ("world",)) == 0
    assert prefix_at_end("ab", ("abc", "b")) == 2
    assert prefix_at_end("", ("x",)) == 0


def test_sample_greedy_rows_and_seeded_rows_are_independent():
    class S:
        def __init__(self, temperature, seed):
            self.params = SamplingParams(max_tokens=1, temperature=temperature)
            self.generator = torch.Generator().manual_seed(seed)
    logits = torch.tensor([[0.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
    picks = [sample(logits, [S(0, 0), S(1.0, s)])[1] for s in range(20)]
    assert sample(logits, [S(0, 0), S(1.0, 0)])[0] == 1 and len(set(picks)) > 1


def test_adapters_mixed_batch_and_lru_eviction(tmp_path_factory):
    base = tiny_model(tmp_path_factory.mktemp("base"), "llama-tiny")
    adapters = {name: str(tiny_adapter(base, tmp_path_factory.mktemp(name), seed)) for name, seed in (("a", 1), ("b", 2))}
    from peft import PeftModel
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    expected = {}
    for name, path in adapters.items():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).eval()
        expected[name] = greedy_reference(tuned, tok, "Debian is", 12)
    expected[None] = greedy_reference(AutoModelForCausalLM.from_pretrained(base).eval(), tok, "Debian is", 12)
    assert len(set(expected.values())) == 3, "the adapters should change the outputs"

    engine = Engine(AutoModelForCausalLM.from_pretrained(base), tok, EngineSettings(max_batch_size=8, max_model_len=64,
                                                                                    max_loaded_adapters=1), adapters=adapters)
    engine.stop_token_ids = set()
    try:
        ids = tok("Debian is")["input_ids"]
        # base and adapter "a" decode in the same batch
        base_c, a_c = Collector(), Collector()
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), base_c)
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), a_c, adapter="a")
        assert base_c.wait().text[0] == expected[None] and a_c.wait().text[0] == expected["a"]
        assert engine.stats()["adapters_loaded"] == ["a"]
        b_c = Collector()
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), b_c, adapter="b")
        assert b_c.wait().text[0] == expected["b"]
        assert engine.stats()["adapters_loaded"] == ["b"]  # "a" was evicted: one adapter at a time
        again = Collector()
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), again, adapter="a")
        assert again.wait().text[0] == expected["a"]
        with pytest.raises(KeyError):
            engine.submit(ids, SamplingParams(max_tokens=4), Collector(), adapter="nope")
    finally:
        engine.shutdown()


def test_first_tokens_go_out_before_the_next_decode_step(loaded):
    """The step hook (the engine process sends events from it) runs right after a prefill: a new request's first
    token does not wait for the running batch's next decode step."""
    model, tok = loaded
    steps, hooks = [0], []
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=64),
                    after_step=lambda: hooks.append((engine.tokens_generated, steps[0])))
    decode = engine._decode_step

    def counted_decode():
        steps[0] += 1
        decode()

    engine._decode_step = counted_decode
    try:
        c = Collector()
        engine.submit(tok("How do I")["input_ids"], SamplingParams(max_tokens=4, temperature=0), c)
        c.wait()
    finally:
        engine.shutdown()  # the thread's last hook has run
    assert hooks[0] == (1, 0)  # the first token sampled, no decode step run yet
    assert hooks[-1] == (4, 3)


def test_incremental_detokenization_matches_full_decode(loaded):
    """Text is decoded a few tokens at a time: what is sent, piece by piece, adds up to the full decode, and no
    piece carries half of a multi-byte character (the emoji is not in the tiny vocabulary: it comes out as byte
    tokens, each of which alone decodes to U+FFFD)."""
    from llmforge.serve.engine import RequestHandle, Sequence
    model, tok = loaded
    ids = tok("安装 nginx 🙂 软件包 ok 🙂🙂", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens that split a character"
    engine = Engine(model, tok, EngineSettings(max_batch_size=2, max_model_len=64))
    try:
        pieces, reasons = [], []
        seq = Sequence(0, [1], SamplingParams(max_tokens=len(ids)), None,
                       lambda e: (pieces.append(e.text), reasons.append(e.finish_reason)), torch.Generator(), RequestHandle())
        for token in ids:
            done = engine._append(seq, token)
        assert done and reasons[-1] == "length"
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces) and len(pieces) > 3
    finally:
        engine.shutdown()


def test_prefill_groups_split_by_length_at_least_cost():
    """Every prompt in exactly one batch; the split minimizes passes x pass cost + padded tokens (checked against
    every split of the sorted prompts into consecutive runs)."""
    import itertools
    import random

    from llmforge.serve.engine import prefill_groups

    def cost(lengths, groups, pass_cost):
        return sum(pass_cost + len(g) * max(lengths[i] for i in g) for g in groups)

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 7))]
        pass_cost = rng.choice([0, 16, 64, 4096])
        groups = prefill_groups(lengths, pass_cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(cost(lengths, [order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], pass_cost)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(lengths, groups, pass_cost) == best
    assert prefill_groups([10, 120, 12, 118], 4096) == [[0, 2, 3, 1]]  # a GPU pads rather than run twice
    assert prefill_groups([], 64) == []


@contextlib.contextmanager
def fixed_length_engine(loaded, **settings):
    """An engine on the module's model that never stops early (random weights), shut down afterwards."""
    model, tok = loaded
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=64, **settings))
    engine.stop_token_ids = set()
    try:
        yield engine
    finally:
        engine.shutdown()


def test_a_temperature_too_small_to_sample_is_greedy_not_a_crash(loaded):
    """logits / 1e-158 overflow to inf and multinomial raised, which killed the step (found by the fuzz test)."""
    tok = loaded[1]
    with fixed_length_engine(loaded) as engine:
        tiny_t = run(engine, tok, "Debian is", max_tokens=6, temperature=8.8e-158)
        greedy = run(engine, tok, "Debian is", max_tokens=6, temperature=0)
        assert tiny_t.reason == ["length"] and tiny_t.text == greedy.text


def test_a_request_that_breaks_its_step_fails_alone(loaded, monkeypatch, tmp_path):
    """A prefill that raises for one request (here: made to, for seed 666) and an adapter that cannot load end
    those requests only; the others finish and the engine serves on. Before, the failed prefill's sequences
    were neither running nor queued and never finished, and every request in flight was aborted."""
    import llmforge.serve.engine as engine_module
    model, tok = loaded
    real_sample = engine_module.sample

    def poisoned(logits, seqs):
        if any(s.params.seed == 666 for s in seqs):
            raise RuntimeError("poisoned request")
        return real_sample(logits, seqs)
    monkeypatch.setattr(engine_module, "sample", poisoned)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    engine = Engine(model, tok, EngineSettings(max_batch_size=4, max_model_len=64), adapters={"broken": str(broken)})
    engine.stop_token_ids = set()
    try:
        ids = tok("Debian is")["input_ids"]
        long_one, bad, good, bad_adapter = Collector(), Collector(), Collector(), Collector()
        engine.submit(ids, SamplingParams(max_tokens=30, temperature=0), long_one)
        while engine.stats()["running"] == 0:
            threading.Event().wait(0.005)
        engine.submit(ids, SamplingParams(max_tokens=4, temperature=1.0, seed=666), bad)
        engine.submit(ids, SamplingParams(max_tokens=4, temperature=1.0, seed=1), good)
        engine.submit(ids, SamplingParams(max_tokens=4, temperature=0), bad_adapter, adapter="broken")
        assert bad.wait().reason == ["abort"] and bad_adapter.wait().reason == ["abort"]
        assert good.wait().reason == ["length"] and long_one.wait().reason == ["length"]
        assert long_one.tokens == [30]
        assert run(engine, tok, "How do I", max_tokens=3, temperature=0).reason == ["length"]
    finally:
        engine.shutdown()


def test_a_top_p_below_float32_range_keeps_the_most_likely_token(loaded):
    """top_p=8.8e-158 compared as 0.0 in float32, kept no token, and multinomial raised (found by the fuzz)."""
    tok = loaded[1]
    with fixed_length_engine(loaded) as engine:
        tiny_p = run(engine, tok, "Debian is", max_tokens=6, temperature=1.0, top_p=8.8e-158)
        greedy = run(engine, tok, "Debian is", max_tokens=6, temperature=0)
        assert tiny_p.reason == ["length"] and tiny_p.text == greedy.text


def test_a_row_whose_sampling_fails_ends_alone_in_the_decode_step(loaded, monkeypatch):
    """A sampling failure of one running row (made to happen here for seed 7 once both rows are decoding) ends
    that sequence only; the other rows of the same decode step go on."""
    import llmforge.serve.engine as engine_module
    tok = loaded[1]
    real_multinomial = torch.multinomial
    calls = {"n": 0}

    def flaky(probs, k, generator=None):
        calls["n"] += 1
        if generator is not None and generator.initial_seed() == 7 and calls["n"] > 4:
            raise RuntimeError("invalid multinomial distribution")
        return real_multinomial(probs, k, generator=generator)
    monkeypatch.setattr(engine_module.torch, "multinomial", flaky)
    with fixed_length_engine(loaded) as engine:
        ids = tok("Debian is")["input_ids"]
        bad, good = Collector(), Collector()
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=7), bad)
        engine.submit(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=8), good)
        assert bad.wait().reason == ["abort"] and 0 < bad.tokens[0] < 12
        assert good.wait().reason == ["length"] and good.tokens == [12]
