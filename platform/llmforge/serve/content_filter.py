"""Blocked-term matching that look-alike text cannot slip past, on prompts and on generated text.

Both sides are compared folded: Unicode NFKC (full-width ``ｓｅｃｒｅｔ`` is ``secret``), case-folded
(``SECRET``, ``ſecret``) and without zero-width or other format characters (``se\\u200bcret``). Folding can
change a text's length (``"İ".casefold()`` is two characters), so every folded character remembers the
original character it came from: a match found in the folded text cuts the original at the right place.
"""

from __future__ import annotations

import unicodedata


def _fold_char(ch: str) -> str:
    if unicodedata.category(ch) == "Cf":  # zero-width spaces and joiners, soft hyphens, direction marks
        return ""
    return unicodedata.normalize("NFKC", ch).casefold()


def fold(text: str) -> tuple[str, list[int]]:
    """The folded text, and for each of its characters the index of the original character it came from."""
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        folded = _fold_char(ch)
        out.append(folded)
        origin.extend([i] * len(folded))
    return "".join(out), origin


def fold_terms(terms) -> tuple[str, ...]:
    """The blocked terms as they are compared (empty ones after folding are dropped)."""
    return tuple(t for t in (fold(term)[0] for term in terms) if t)


def contains(text: str, folded_terms: tuple[str, ...]) -> bool:
    folded, _ = fold(text)
    return any(term in folded for term in folded_terms)


def prefix_at_end(text: str, terms) -> int:
    """How many trailing characters of ``text`` could be the start of one of ``terms`` (the longest such suffix)."""
    longest = 0
    for term in terms:
        for k in range(min(len(term) - 1, len(text)), longest, -1):
            if text.endswith(term[:k]):
                longest = k
                break
    return longest


def scan(text: str, folded_terms: tuple[str, ...]) -> tuple[int | None, int]:
    """Where in the original ``text`` the earliest blocked term starts (None if none does), and how many of its
    trailing characters could begin one (not to be sent yet; 0 when a term was found). Folds ``text`` once."""
    if not folded_terms:
        return None, 0
    folded, origin = fold(text)
    hits = [at for at in (folded.find(term) for term in folded_terms) if at >= 0]
    if hits:
        return origin[min(hits)], 0
    longest = prefix_at_end(folded, folded_terms)
    return None, len(text) - origin[len(folded) - longest] if longest else 0
