"""PII masking with typed placeholders: ``<EMAIL>``, ``<PHONE>``, ``<ID_CN>``, ``<CARD>``, ``<IP>``.

Patterns find candidates; validators (ID checksum and birth date, Luhn and card prefixes, address
parsing) decide. Boundaries are written as explicit look-arounds over ASCII letters and digits, not
``\\b``: in Python ``\\b`` treats Chinese characters as word characters, so ``电话13812345678`` would
not match. Look-alikes (order numbers, timestamps, versions, hashes, ISBNs, dates, prices) fail
either the pattern or the validator and stay as they are.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from datetime import date
from typing import Callable, Iterable

from llmforge.config import PiiConfig

_ALNUM_BEFORE = r"(?<![0-9A-Za-z])"
_ALNUM_AFTER = r"(?![0-9A-Za-z])"

EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
ID_CN = re.compile(_ALNUM_BEFORE + r"[1-9]\d{16}[0-9Xx]" + _ALNUM_AFTER)
# 13-19 digits, either contiguous or in groups separated by one space or dash.
CARD = re.compile(r"(?<![0-9A-Za-z+.,/-])\d(?:[ -]?\d){12,18}(?![0-9A-Za-z]|[.,/-]\d)")
PHONE_CN_MOBILE = re.compile(
    r"(?<![0-9A-Za-z+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + r"(?![0-9A-Za-z])"
)
PHONE_INTL = re.compile(r"(?<![0-9A-Za-z+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![0-9A-Za-z])")
PHONE_NANP = re.compile(r"(?<![0-9A-Za-z(])(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}(?![0-9A-Za-z]|[-.]\d)")
PHONE_CN_LANDLINE = re.compile(r"(?<![0-9A-Za-z-])(?:\(0\d{2,3}\) ?|0\d{2,3}-)[2-9]\d{6,7}(?![0-9A-Za-z]|-\d)")
IPV4 = re.compile(
    r"(?<![0-9A-Za-z.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![0-9A-Za-z]|\.\d)"
)
IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_PROVINCES = {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
              50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 91}


def valid_cn_id(candidate: str) -> bool:
    """An 18-character Chinese resident ID: province code, a real birth date, and the check character."""
    value = candidate.upper()
    if len(value) != 18 or not value[:17].isdigit() or int(value[:2]) not in _PROVINCES:
        return False
    try:
        born = date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= date.today().year:
        return False
    total = sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == value[17]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(d: str) -> bool:
    """Issuer prefixes of the major networks (Visa, Mastercard, Amex, Discover, UnionPay, JCB, Diners)."""
    two, four = int(d[:2]), int(d[:4])
    return (
        d[0] == "4"
        or 51 <= two <= 55 or 2221 <= four <= 2720
        or two in (34, 37, 36, 38, 62, 65)
        or four == 6011 or 644 <= int(d[:3]) <= 649
        or 3528 <= four <= 3589 or 300 <= int(d[:3]) <= 305
    )


def valid_card(candidate: str) -> bool:
    """13-19 digits, a network prefix, the Luhn checksum, and card-like grouping when separated."""
    groups = re.split(r"[ -]", candidate)
    digits = "".join(groups)
    if not 13 <= len(digits) <= 19 or not _card_prefix_ok(digits) or not luhn_ok(digits):
        return False
    if len(groups) == 1:
        return True
    sizes = [len(g) for g in groups]
    return all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4 or sizes == [4, 6, 5] or sizes == [4, 6, 4]


def _phone_digits_ok(candidate: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in candidate) <= 15


def valid_ipv6(candidate: str) -> bool:
    # A decimal digit is required: `a::b` and `dead::beef` are code far more often than addresses.
    if candidate.count(":") < 2 or not any(ch.isdigit() for ch in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


Rule = tuple[str, re.Pattern, Callable[[str], bool] | None]

# RE2 prefilters (pyarrow.compute, a whole batch per call): for each builtin pattern, one that matches every text
# the pattern can match in: its core without the look-arounds, digits as any Unicode digit (Python's \d). A
# rule then runs only on the texts its prefilter matched; most texts have no candidate for most rules. Exact,
# not a heuristic: a match of a later rule in a text where earlier placeholders were put is made of original
# characters (its class holds no '<' or '>'), so the prefilter matched it in the original text.
_D = r"\p{Nd}"
_PREFILTER = {
    EMAIL.pattern: r"[A-Za-z0-9._%+-]@[A-Za-z0-9]",
    ID_CN.pattern: rf"[1-9]{_D}{{16}}[0-9Xx]",
    CARD.pattern: rf"{_D}(?:[ -]?{_D}){{12}}",
    PHONE_CN_MOBILE.pattern: rf"1[3-9]{_D}(?:[ -]?{_D}{{4}}){{2}}",
    PHONE_INTL.pattern: r"\+[1-9]",
    PHONE_NANP.pattern: rf"(?:\({_D}{{3}}\) ?|{_D}{{3}}[-.]){_D}{{3}}[-.]{_D}{{4}}",
    PHONE_CN_LANDLINE.pattern: rf"(?:\(0{_D}{{2,3}}\) ?|0{_D}{{2,3}}-)[2-9]{_D}{{6}}",
    IPV4.pattern: rf"(?:{_D}{{1,3}}\.){{3}}{_D}{{1,3}}",
    IPV6.pattern: r":[0-9A-Fa-f]{0,4}:",
}

# Order matters: each rule sees the text with earlier placeholders already in place, so an ID
# number is never re-read as a phone number or a card.
_BUILTIN: tuple[Rule, ...] = (
    ("EMAIL", EMAIL, None),
    ("ID_CN", ID_CN, valid_cn_id),
    ("CARD", CARD, valid_card),
    ("PHONE", PHONE_CN_MOBILE, None),
    ("PHONE", PHONE_INTL, _phone_digits_ok),
    ("PHONE", PHONE_NANP, None),
    ("PHONE", PHONE_CN_LANDLINE, None),
    ("IP", IPV4, None),
    ("IP", IPV6, valid_ipv6),
)


class PiiMasker:
    """Masks the PII types enabled in ``cfg`` and any extra patterns, counting what it replaced."""

    def __init__(self, cfg: PiiConfig):
        enabled = set(cfg.types) if cfg.enabled else set()
        self.rules: list[Rule] = [r for r in _BUILTIN if r[0] in enabled]
        if cfg.enabled:
            self.rules += [(p.name, re.compile(p.pattern), None) for p in cfg.extra_patterns]

    def candidates(self, texts: list[str]) -> list[list[Rule]]:
        """For each text the rules that may match in it, found by the RE2 prefilters over the whole list (a rule
        without one, such as a user's extra pattern, may match anywhere)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        array = pa.array(texts, pa.large_string())
        maybe = []
        for rule in self.rules:
            prefilter = _PREFILTER.get(rule[1].pattern)
            hits = (pc.match_substring_regex(array, prefilter).to_numpy(zero_copy_only=False) if prefilter
                    else [True] * len(texts))
            maybe.append(hits)
        return [[rule for rule, hits in zip(self.rules, maybe) if hits[i]] for i in range(len(texts))]

    def mask(self, text: str, rules: list[Rule] | None = None) -> tuple[str, Counter]:
        """``text`` with the PII of ``rules`` (default: all enabled) masked, and the counts by type."""
        found: Counter = Counter()
        for name, pattern, validator in self.rules if rules is None else rules:
            def replace(match: re.Match, name=name, validator=validator) -> str:
                if validator is not None and not validator(match.group(0)):
                    return match.group(0)
                found[name] += 1
                return f"<{name}>"
            text = pattern.sub(replace, text)
        return text, found


def mask_value(value, masker: PiiMasker, found: Counter):
    """``value`` (parsed JSON) with PII masked in every string, and in every number whose digits are PII (a
    phone number stored as an integer); keys are left alone."""
    if isinstance(value, dict):
        return {k: mask_value(v, masker, found) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(v, masker, found) for v in value]
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        masked, hits = masker.mask(str(value))
        found.update(hits)
        return masked if hits or isinstance(value, str) else value
    return value


def mask_batch(batch: dict[str, list], masker: PiiMasker, meta_policy: str = "mask") -> dict[str, list]:
    """Mask ``text`` (and per ``meta_policy`` the other fields in ``meta``) of the rows still kept; ``pii`` gets
    ``"TYPE=count,..."`` per row (empty if none). Rejected rows stay as they were: rejects/ holds originals."""
    texts, metas, pii = [], [], []
    kept = [text for text, reason in zip(batch["text"], batch["reject_reason"]) if reason is None]
    candidates = iter(masker.candidates(kept))
    for text, meta, reason in zip(batch["text"], batch["meta"], batch["reject_reason"]):
        if reason is not None:
            texts.append(text)
            metas.append(meta)
            pii.append("")
            continue
        rules = next(candidates)
        masked, found = masker.mask(text, rules) if rules else (text, Counter())
        if meta and meta_policy == "drop":
            meta = ""
        elif meta and meta_policy == "mask":
            meta = json.dumps(mask_value(json.loads(meta), masker, found), ensure_ascii=False)
        texts.append(masked)
        metas.append(meta)
        pii.append(format_counts(found))
    originals = [o if o is not None or t == m else t
                 for o, t, m in zip(batch["original"], batch["text"], texts)]
    return {**batch, "text": texts, "meta": metas, "original": originals, "pii": pii}


def format_counts(counts: Counter) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items()))


def parse_counts(values: Iterable[str]) -> Counter:
    total: Counter = Counter()
    for value in values:
        for item in filter(None, (value or "").split(",")):
            name, _, count = item.partition("=")
            total[name] += int(count)
    return total
