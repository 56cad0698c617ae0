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
_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newline
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
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
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


def _encode(toks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each token's id (equal tokens, equal ids) and length, computed once per document in Arrow's C++."""
    arr = pa.array(toks, pa.string())
    codes = arr.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.uint64)
    return codes, pc.utf8_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _ngrams(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inverse, counts, first)`` of the n-grams of a document's token ids: each n-gram's index among the
    distinct n-grams, how often each distinct one occurs and where it first does. N-grams are told apart by a
    64-bit hash of their token ids (a collision: about one in 10**19 pairs)."""
    grams = np.zeros(len(codes) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            grams = grams * _MIX + codes[j:len(codes) - n + 1 + j] + np.uint64(1)
    _, first, inverse, counts = np.unique(grams, return_index=True, return_inverse=True, return_counts=True)
    return inverse, counts, first


def _top_ngram_fraction(codes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters covered by the most frequent n-gram (all its occurrences), over all token characters; of
    equally frequent ones, the one that comes first. ``codes``, ``lengths``: :func:`_encode` of the tokens."""
    if len(codes) < n + 1:
        return 0.0
    _, counts, first = _ngrams(codes, n)
    top = counts.max()
    if top < 2:
        return 0.0
    start = int(first[counts == top].min())
    return int(top) * int(lengths[start:start + n].sum()) / int(lengths.sum())


def _duplicate_ngram_fraction(codes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters inside n-grams that occur more than once, over all token characters."""
    if len(codes) < 2 * n:
        return 0.0
    inverse, counts, _ = _ngrams(codes, n)
    starts = np.flatnonzero(counts[inverse] > 1)
    edges = np.zeros(len(codes) + 1, np.int64)  # +1 where a repeated n-gram starts, -1 past its end
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + n, -1)
    covered = np.cumsum(edges[:-1]) > 0
    return int(lengths[covered].sum()) / int(lengths.sum())


def quality_issue(text: str, cfg: DataConfig) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``text`` fails the filter, else None. Checks run cheapest first."""
    length = len(text)
    if length == 0:
        return "empty", "no text after normalization"
    if length < cfg.min_chars:
        return "too_short", f"{length} chars < min_chars {cfg.min_chars}"
    if length > cfg.max_chars:
        return "too_long", f"{length} chars > max_chars {cfg.max_chars}"
    ratio = _symbol_ratio(text)
    if ratio > cfg.max_symbol_ratio:
        return "symbol_ratio", f"symbols {ratio:.2f} > max_symbol_ratio {cfg.max_symbol_ratio}"
    frac = _duplicate_line_fraction(text)
    if frac > cfg.max_duplicate_line_fraction:
        return "repeated_lines", f"{frac:.2f} of line chars repeat > {cfg.max_duplicate_line_fraction}"
    toks = tokens(text)
    if len(toks) >= 20:
        unique = len(set(toks)) / len(toks)
        if unique < cfg.min_unique_token_ratio:
            return "low_diversity", f"unique tokens {unique:.2f} < min_unique_token_ratio {cfg.min_unique_token_ratio}"
    if len(toks) < cfg.repetition_min_tokens:
        return None
    codes, lengths = _encode(toks)
    for n, limit in ((2, cfg.max_top_2gram_fraction), (3, cfg.max_top_3gram_fraction)):
        frac = _top_ngram_fraction(codes, lengths, n)
        if frac > limit:
            return "repeated_ngrams", f"top {n}-gram covers {frac:.2f} > {limit}"
    frac = _duplicate_ngram_fraction(codes, lengths, cfg.duplicate_ngram_size)
    if frac > cfg.max_duplicate_ngram_fraction:
        return "repeated_ngrams", (
            f"repeated {cfg.duplicate_ngram_size}-grams cover {frac:.2f} > {cfg.max_duplicate_ngram_fraction}"
        )
    return None


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
    """Mark rows that fail the quality filter with their reason; rows are never removed here."""
    reasons, details = list(batch["reject_reason"]), list(batch["reject_detail"])
    for i, text in enumerate(batch["text"]):
        if reasons[i] is None:
            issue = quality_issue(text, cfg)
            if issue:
                reasons[i], details[i] = issue
    return {**batch, "reject_reason": reasons, "reject_detail": details}
