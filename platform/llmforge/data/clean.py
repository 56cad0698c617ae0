"""Normalization and the quality filter: pure functions on strings and on column batches.

Nothing here assumes words are separated by spaces: text is split into "tokens" that are runs of
letters/digits for alphabetic scripts and single characters for CJK, and every threshold is a
fraction of characters, so the same numbers hold for Chinese and English.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmforge.config import DataConfig

# ANSI/VT100 escape sequences (CSI, OSC and two-character escapes), as left behind by terminal logs.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# Control characters except tab and newline (C0, DEL, C1), plus zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")
CJK = "\u2e80-\u9fff\uf900-\ufaff\uac00-\ud7af\u3040-\u30ff"  # the ranges whose characters are tokens of their own
_TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")


def normalize_text(text: str, form: str = "NFKC") -> str:
    """Unicode normalization, no escape or control characters, tidy whitespace."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ANSI.sub("", text)
    text = _CONTROL.sub("", text)
    # Each line's whitespace runs become one space, its edges none (str.split's whitespace is re's \s).
    text = "\n".join([" ".join(line.split()) for line in text.split("\n")])
    return _BLANK_LINES.sub("\n\n", text).strip()


def tokens(text: str) -> list[str]:
    """Words for alphabetic scripts, single characters for CJK; punctuation is dropped."""
    return _TOKEN.findall(text)


# Layout, counted no more than whitespace: box-drawing and block characters, and the rules and cell bars of
# ASCII and Markdown tables (a line that starts and ends with | or +).
_LAYOUT = re.compile(r"[\s\u2500-\u259f]")
_TABLE_LINE = re.compile(r"^[ \t]*[|+].*[|+][ \t]*$", re.M)
_TABLE_MARKS = re.compile(r"[|+=:-]")


_WORD_CHARS = re.compile(r"[^\W_]+")  # letters and digits (str.isalnum), the rest of visible text is symbols


def _symbol_ratio(text: str) -> float:
    visible = _LAYOUT.sub("", _TABLE_LINE.sub(lambda m: _TABLE_MARKS.sub("", m.group(0)), text))
    if not visible:
        return 1.0
    return len(_WORD_CHARS.sub("", visible)) / len(visible)


def _duplicate_line_fraction(text: str) -> float:
    """Characters in lines that repeat an earlier line, as a fraction of all line characters. Lines without a
    letter or digit (a table's rules, ``---``) are layout, not content, and are left out."""
    lines = [line for line in text.split("\n") if _WORD_CHARS.search(line)]
    total = sum(len(line) for line in lines)
    if total == 0 or len(lines) < 2:
        return 0.0
    seen: set[str] = set()
    dup = 0
    for line in lines:
        if line in seen:
            dup += len(line)
        seen.add(line)
    return dup / total


_MIX = np.uint64(0x9E3779B97F4A7C15)


class _Ngrams:
    """The n-grams of many documents' tokens at once: ``docs`` token lists laid end to end (``codes``: each
    token's id, equal tokens equal ids, from one Arrow dictionary encoding; ``lengths``: its characters), the
    n-grams that fit inside one document grouped by (document, n-gram) in one sort. N-grams are told apart by a
    64-bit hash of their token ids (a collision: about one in 10**19 pairs)."""

    def __init__(self, docs: list[list[str]]):
        self.sizes = np.fromiter(map(len, docs), np.int64, count=len(docs))
        flat = pa.array([t for toks in docs for t in toks], pa.large_string())
        self.codes = flat.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.uint64)
        self.lengths = pc.utf8_length(flat).to_numpy(zero_copy_only=False).astype(np.int64)
        self.starts = np.cumsum(self.sizes) - self.sizes
        self.doc = np.repeat(np.arange(len(docs)), self.sizes)
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
        self.total = self.cum[self.starts + self.sizes] - self.cum[self.starts]  # token characters per document

    def runs(self, n: int):
        """``(pos, pos_count, run_doc, run_first, run_count)``: the start of every n-gram inside a document and
        how often its n-gram occurs in that document; per distinct (document, n-gram): its document, first start
        and count."""
        windows = len(self.codes) - n + 1
        if windows <= 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, empty, empty
        grams = np.zeros(windows, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                grams = grams * _MIX + self.codes[j:windows + j] + np.uint64(1)
            pos = np.arange(windows)
            doc = self.doc[:windows]
            pos = pos[pos - self.starts[doc] <= self.sizes[doc] - n]
            keys = grams[pos] * _MIX + self.doc[pos].astype(np.uint64)  # the document is part of the key
        order = np.argsort(keys)
        k = keys[order]
        run_start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        run_count = np.diff(np.append(run_start, len(order)))
        run_first = np.minimum.reduceat(pos[order], run_start)
        pos_count = np.empty(len(order), np.int64)
        pos_count[order] = np.repeat(run_count, run_count)
        return pos, pos_count, self.doc[run_first], run_first, run_count

    def top_fraction(self, n: int) -> np.ndarray:
        """Per document: characters covered by its most frequent n-gram (all its occurrences), over all its token
        characters; of equally frequent ones, the one that comes first. 0 below ``n + 1`` tokens or without a
        repeat."""
        out = np.zeros(len(self.sizes))
        _, _, run_doc, run_first, run_count = self.runs(n)
        top = np.zeros(len(self.sizes), np.int64)
        np.maximum.at(top, run_doc, run_count)
        is_top = run_count == top[run_doc]
        first = np.full(len(self.sizes), len(self.codes), np.int64)
        np.minimum.at(first, run_doc[is_top], run_first[is_top])
        ok = np.flatnonzero((top >= 2) & (self.sizes >= n + 1))
        chars = self.cum[first[ok] + n] - self.cum[first[ok]]
        out[ok] = top[ok] * chars / self.total[ok]
        return out

    def duplicate_fraction(self, n: int) -> np.ndarray:
        """Per document: characters inside n-grams that occur more than once, over all its token characters; 0
        below ``2 * n`` tokens."""
        pos, pos_count, _, _, _ = self.runs(n)
        repeated = pos[pos_count > 1]
        size = len(self.codes) + 1
        edges = np.bincount(repeated, minlength=size) - np.bincount(repeated + n, minlength=size)
        covered = np.cumsum(edges[:-1]) > 0  # an interval never leaves its document
        chars = np.bincount(self.doc, weights=self.lengths * covered, minlength=len(self.sizes))
        return np.where(self.sizes >= 2 * n, chars / np.maximum(self.total, 1), 0.0)


def _repetition_issues(docs: list[list[str]], cfg: DataConfig) -> list[tuple[str, str] | None]:
    """The repeated n-gram checks of :func:`quality_issues`, for all ``docs`` (token lists) at once."""
    if not docs:
        return []
    grams = _Ngrams(docs)
    issues: list[tuple[str, str] | None] = [None] * len(docs)
    checks = [(grams.top_fraction(2), cfg.max_top_2gram_fraction, "top 2-gram covers {:.2f} > {}"),
              (grams.top_fraction(3), cfg.max_top_3gram_fraction, "top 3-gram covers {:.2f} > {}"),
              (grams.duplicate_fraction(cfg.duplicate_ngram_size), cfg.max_duplicate_ngram_fraction,
               f"repeated {cfg.duplicate_ngram_size}-grams cover {{:.2f}} > {{}}")]
    for fractions, limit, detail in checks:
        for i in np.flatnonzero(fractions > limit).tolist():
            if issues[i] is None:
                issues[i] = ("repeated_ngrams", detail.format(float(fractions[i]), limit))
    return issues


def quality_issues(texts: list[str], cfg: DataConfig) -> tuple[list[tuple[str, str] | None], list[list[str] | None]]:
    """Per text ``(reason, detail)`` when it fails the filter, else None; and its :func:`tokens` where they were
    computed (every text that passes has them). Checks run cheapest first; the repeated n-gram checks, the
    costliest, on all texts that reach them together."""
    issues: list[tuple[str, str] | None] = [None] * len(texts)
    toks_of: list[list[str] | None] = [None] * len(texts)
    pending = []
    for i, text in enumerate(texts):
        length = len(text)
        if length == 0:
            issues[i] = ("empty", "no text after normalization")
            continue
        if length < cfg.min_chars:
            issues[i] = ("too_short", f"{length} chars < min_chars {cfg.min_chars}")
            continue
        if length > cfg.max_chars:
            issues[i] = ("too_long", f"{length} chars > max_chars {cfg.max_chars}")
            continue
        ratio = _symbol_ratio(text)
        if ratio > cfg.max_symbol_ratio:
            issues[i] = ("symbol_ratio", f"symbols {ratio:.2f} > max_symbol_ratio {cfg.max_symbol_ratio}")
            continue
        frac = _duplicate_line_fraction(text)
        if frac > cfg.max_duplicate_line_fraction:
            issues[i] = ("repeated_lines", f"{frac:.2f} of line chars repeat > {cfg.max_duplicate_line_fraction}")
            continue
        toks = toks_of[i] = tokens(text)
        if len(toks) >= 20:
            unique = len(set(toks)) / len(toks)
            if unique < cfg.min_unique_token_ratio:
                issues[i] = ("low_diversity",
                             f"unique tokens {unique:.2f} < min_unique_token_ratio {cfg.min_unique_token_ratio}")
                continue
        if len(toks) >= cfg.repetition_min_tokens:
            pending.append(i)
    for i, issue in zip(pending, _repetition_issues([toks_of[i] for i in pending], cfg)):
        issues[i] = issue
    return issues, toks_of


def quality_issue(text: str, cfg: DataConfig) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``text`` fails the filter, else None."""
    return quality_issues([text], cfg)[0][0]


def normalize_batch(batch: dict[str, list], cfg: DataConfig) -> dict[str, list]:
    """Normalize ``text`` of the rows not yet rejected; keep the original when it changed."""
    texts, originals = [], []
    for text, original, reason in zip(batch["text"], batch["original"], batch["reject_reason"]):
        if reason is not None:
            texts.append(text)
            originals.append(original)
            continue
        clean = normalize_text(text, cfg.unicode_form)
        texts.append(clean)
        originals.append(original if original is not None else (text if clean != text else None))
    return {**batch, "text": texts, "original": originals}


def filter_batch(batch: dict[str, list], cfg: DataConfig) -> dict[str, list]:
    """Mark rows that fail the quality filter with their reason; rows are never removed here. ``tokens`` holds
    each kept row's :func:`tokens` (None for the others) for the steps after, on the same text."""
    reasons, details = list(batch["reject_reason"]), list(batch["reject_detail"])
    todo = [i for i, reason in enumerate(reasons) if reason is None]
    issues, toks = quality_issues([batch["text"][i] for i in todo], cfg)
    kept_tokens: list[list[str] | None] = [None] * len(reasons)
    for i, issue, t in zip(todo, issues, toks):
        if issue:
            reasons[i], details[i] = issue
        else:
            kept_tokens[i] = t
    return {**batch, "reject_reason": reasons, "reject_detail": details, "tokens": kept_tokens}
