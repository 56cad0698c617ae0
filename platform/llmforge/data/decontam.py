"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

As in GPT-3's and Llama's data cards: text is lower-cased and split into the tokens of ``clean.tokens``
(words for alphabetic scripts, single characters for CJK, punctuation dropped), and a document that shares
any ``data.decontaminate_ngram``-gram (13 by default) with an evaluation item is rejected as
``contaminated``. The evaluation sets (``data.decontaminate``) are JSONL files, every string value of a record
an item of its own (question, passage, each choice, answer: an n-gram across two fields would be one no
document holds), or text files, one item per non-empty line. Items
with fewer tokens than n are matched whole (a document containing the item's token sequence) when they have at
least ``MIN_SHORT_ITEM`` tokens; shorter ones ("yes", "B") would match everywhere and are left out, counted.
"""

from __future__ import annotations

import gzip
import json
import logging

from llmforge import storage
from llmforge.data.clean import tokens
from llmforge.errors import InputError

log = logging.getLogger(__name__)
SEP = "\x1f"
MIN_SHORT_ITEM = 8


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_items(uri: str) -> list[str]:
    """The items of one evaluation file (JSONL records or text lines)."""
    if not storage.exists(uri):
        raise InputError(f"data.decontaminate: {uri} does not exist.", fix="list evaluation files that exist.")
    raw = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", errors="replace")
    name = uri[:-3] if uri.endswith(".gz") else uri
    if name.endswith(".jsonl") or name.endswith(".json"):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.extend(_strings(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"data.decontaminate: {uri} line {n} is not JSON ({exc.msg}).",
                                 fix="give JSONL (one record per line) or a .txt file (one item per line).") from None
        return items
    return [line for line in text.splitlines() if line.strip()]


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in tokens(text)]


class EvalNgrams:
    """The n-grams of the evaluation sets (exact strings, so no hash collisions), and their short items."""

    def __init__(self, files: list[str], n: int):
        self.n, self.grams, self.short, self.where, self.skipped = n, set(), set(), {}, 0
        for uri in files:
            for item in eval_items(uri):
                toks = _tokens(item)
                if not toks:
                    continue
                if len(toks) < min(n, MIN_SHORT_ITEM):
                    self.skipped += 1
                    continue
                if len(toks) < n:
                    key = SEP.join(toks)
                    self.short.add(key)
                    self.where.setdefault(key, uri)
                    continue
                for i in range(len(toks) - n + 1):
                    gram = SEP.join(toks[i:i + n])
                    if gram not in self.grams:
                        self.grams.add(gram)
                        self.where[gram] = uri
        self.short_lengths = sorted({key.count(SEP) + 1 for key in self.short})
        log.info("decontamination: %d %d-grams and %d shorter items from %d file(s); %d item(s) of fewer than %d "
                 "tokens left out", len(self.grams), n, len(self.short), len(files), self.skipped,
                 min(n, MIN_SHORT_ITEM))

    def match(self, text: str, toks: list[str] | None = None) -> str | None:
        """The first shared n-gram (or short item) of ``text``, as text, or None. ``toks``: its ``clean.tokens``
        when already known."""
        toks = _tokens(text) if toks is None else [t.lower() for t in toks]
        for i in range(len(toks) - self.n + 1):
            gram = SEP.join(toks[i:i + self.n])
            if gram in self.grams:
                return gram
        for length in self.short_lengths:
            for i in range(len(toks) - length + 1):
                gram = SEP.join(toks[i:i + length])
                if gram in self.short:
                    return gram
        return None


def decontaminate_batch(batch: dict[str, list], ngrams: EvalNgrams) -> dict[str, list]:
    """Mark the rows not yet rejected that share an n-gram with the evaluation sets as ``contaminated``."""
    reasons, details = list(batch["reject_reason"]), list(batch["reject_detail"])
    known = batch.get("tokens") or [None] * len(reasons)  # filter_batch's, when it ran
    for i, text in enumerate(batch["text"]):
        if reasons[i] is None:
            gram = ngrams.match(text, known[i])
            if gram is not None:
                reasons[i] = "contaminated"
                details[i] = f"shares {gram.replace(SEP, ' ')!r} with {ngrams.where[gram]}"
    return {**batch, "reject_reason": reasons, "reject_detail": details}
