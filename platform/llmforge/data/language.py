"""Language identification: pure functions on strings and on column batches.

The classifier is py3langid 0.3 (a NumPy port of langid.py, Lui and Baldwin 2012: a naive Bayes model over
byte n-grams, 97 languages, the model inside the wheel; nothing is downloaded). A document that mixes
scripts (Chinese with English commands, say) is not classified as a whole (the CJK bytes outweigh the rest
and the answer is Chinese however much English there is): its CJK part and the rest are classified apart,
and each language gets the share of the document's tokens (CJK characters, words) it was found on. ``lang``
is the language with the largest share, ``lang_score`` the classifier's probability for that part;
``data.languages`` keeps a document when a language holding at least ``data.min_language_share`` of its
tokens is in the list.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llmforge.config import DataConfig
from llmforge.data.clean import CJK, tokens

_CJK_RUN = re.compile(rf"[{CJK}\u3000-\u303f\uff00-\uffef]+")
_CJK_CHAR = re.compile(rf"[{CJK}]")  # clean.tokens makes each of these a token of its own
MAX_CHARS = 1000  # of each part: the classifier settles within a few hundred bytes (bench/RESULTS.md), and its cost is linear


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    load = getattr(LanguageIdentifier, "from_pickled_model", None) or LanguageIdentifier.from_model_file
    return load(MODEL_FILE, norm_probs=True)


def _classify(text: str) -> tuple[str, float]:
    lang, score = _identifier().classify(text[:MAX_CHARS])
    return lang, float(score)


def identify(text: str, min_share: float = 0.2) -> tuple[str, float, dict[str, float]]:
    """``(language, probability, shares)``. ``shares`` maps each language found to its share of the text's
    tokens (``clean.tokens``: CJK characters and words of other scripts). The CJK part and the rest are
    classified apart when each holds at least ``min_share`` (two entries then); a smaller part is left out."""
    toks = [t for t in tokens(text) if not t.isdigit()]  # numbers say nothing of the language
    if not toks:
        return "und", 0.0, {}
    cjk = sum(1 for t in toks if _CJK_CHAR.match(t))
    parts = []
    if cjk / len(toks) >= min_share:
        parts.append((" ".join(_CJK_RUN.findall(text)) if cjk < len(toks) else text, cjk / len(toks)))
    if (len(toks) - cjk) / len(toks) >= min_share:
        parts.append((_CJK_RUN.sub(" ", text) if cjk else text, (len(toks) - cjk) / len(toks)))
    shares: dict[str, float] = {}
    best = ("und", 0.0, -1.0)
    for part, share in parts:
        lang, score = _classify(part)
        shares[lang] = shares.get(lang, 0.0) + share
        if share > best[2]:
            best = (lang, score, share)
    return best[0], best[1], shares


def language_batch(batch: dict[str, list], cfg: DataConfig) -> dict[str, list]:
    """``lang``, ``lang_score`` of the rows not yet rejected; rows of no wanted language (``data.languages``)
    are marked ``language``."""
    wanted = set(cfg.languages)
    reasons, details = list(batch["reject_reason"]), list(batch["reject_detail"])
    langs: list[str | None] = []
    scores: list[float | None] = []
    for i, text in enumerate(batch["text"]):
        if reasons[i] is not None:
            langs.append(None)
            scores.append(None)
            continue
        lang, score, shares = identify(text, cfg.min_language_share)
        langs.append(lang)
        scores.append(round(score, 4))
        if wanted and not any(share >= cfg.min_language_share and code in wanted for code, share in shares.items()):
            found = ", ".join(f"{code} {share:.2f}" for code, share in sorted(shares.items(), key=lambda kv: -kv[1]))
            reasons[i] = "language"
            details[i] = f"{found or 'no letters'} (p {score:.2f}); data.languages {sorted(wanted)}"
    return {**batch, "lang": langs, "lang_score": scores, "reject_reason": reasons, "reject_detail": details}
