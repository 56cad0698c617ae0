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

import numpy as np

from llmforge.config import DataConfig
from llmforge.data.clean import CJK, tokens

_CJK_RUN = re.compile(rf"[{CJK}\u3000-\u303f\uff00-\uffef]+")
_CJK_CHAR = re.compile(rf"[{CJK}]")  # clean.tokens makes each of these a token of its own
MAX_CHARS = 1000  # of each part: the classifier settles within a few hundred bytes (bench/RESULTS.md), and its cost is linear


class NgramClassifier:
    """py3langid's model with its feature extraction vectorised: the same answers, about 4x faster per text.

    langid.py counts byte n-grams (1 to 4 bytes) with an Aho-Corasick automaton walked one byte at a time in
    Python; the count of a feature is the number of places its n-gram occurs in the text's UTF-8 bytes. Here
    the n-grams are read back from the automaton once (the shortest path to each state spells its string), and a
    text's features are found by looking up all its 1..4-byte windows at once, in tables indexed by the
    window's bytes (NumPy). The scores
    are then the same naive Bayes sums over the features found, ``softmax`` of them for the probability (what
    langid.py's ``norm_probs`` computes). tests/unit/test_language_decontam.py checks both against py3langid.
    """

    def __init__(self, ptc: np.ndarray, pc: np.ndarray, classes: list[str], nextmove, output: dict):
        self.ptc, self.pc, self.classes = np.asarray(ptc, np.float32), np.asarray(pc, np.float32), list(classes)
        moves = np.asarray(nextmove, np.int64).reshape(-1, 256)
        # Breadth first, a level at a time in NumPy: the first path to reach a state (frontier in discovery
        # order, then byte order) is its string, kept as its parent state and last byte.
        parent = np.full(len(moves), -1, np.int64)
        last = np.zeros(len(moves), np.int64)
        rank = np.full(len(moves), -1, np.int64)  # discovery order, for the tie-break below
        rank[0] = 0
        frontier, found = np.array([0]), 1
        while frontier.size:
            targets = moves[frontier].ravel()
            states, first = np.unique(targets, return_index=True)
            new = rank[states] < 0
            states, first = states[new], first[new]
            order = np.argsort(first, kind="stable")
            states, first = states[order], first[order]
            parent[states], last[states] = frontier[first // 256], first % 256
            rank[states] = found + np.arange(len(states))
            found += len(states)
            frontier = states

        def string(state: int) -> bytes:
            out = []
            while state > 0:
                out.append(int(last[state]))
                state = int(parent[state])
            return bytes(reversed(out))

        pattern: dict[int, bytes] = {}
        strings = {state: string(state) for state in output if rank[state] >= 0}
        for state in sorted(strings, key=lambda s: (len(strings[s]), rank[s])):  # a feature's own state: its shortest
            for feature in output[state]:
                pattern.setdefault(feature, strings[state])
        if len(pattern) != self.ptc.shape[0] or max(map(len, pattern.values())) > MAX_NGRAM:
            raise RuntimeError("py3langid's model is not the byte 1..4-gram model this classifier reads")
        # Tables indexed by the n-gram's bytes read as a big-endian number: 1- and 2-grams in one (feature id, -1
        # for none), 3-grams in another (feature id + 1, 0 for none, PREFIX set when some 4-gram starts with
        # them: 32 MiB of int16). The 4-grams, 2.7k of them, by binary search, only where a prefix was seen.
        self.short = np.full(1 << 16 | 1 << 8, -1, np.int64)
        self.tri = np.zeros(1 << 24, np.int16)
        quads = []
        for feature, gram in pattern.items():
            value = int.from_bytes(gram, "big")
            if len(gram) <= 2:
                self.short[value + (1 << 16 if len(gram) == 1 else 0)] = feature
            elif len(gram) == 3:
                self.tri[value] |= feature + 1
            else:
                quads.append((value, feature))
                self.tri[value >> 8] |= _PREFIX
        quads.sort()
        self.quad_keys = np.array([k for k, _ in quads], np.int64)
        self.quad_features = np.array([f for _, f in quads], np.int64)
        self.num_features = self.ptc.shape[0]
        if self.num_features >= _PREFIX:
            raise RuntimeError("py3langid's model has more features than this classifier's tables hold")

    def features_of(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """``(feature ids, counts)`` of the byte string ``data``."""
        b = np.frombuffer(data, np.uint8).astype(np.int64)
        found = [self.short[b + (1 << 16)]]
        if len(b) >= 2:
            two = (b[:-1] << 8) | b[1:]
            found.append(self.short[two])
        if len(b) >= 3:
            three = (two[:-1] << 8) | b[2:]
            entry = self.tri[three]
            found.append((entry & (_PREFIX - 1)).astype(np.int64) - 1)
            starts = np.flatnonzero(entry[:-1] & _PREFIX)  # a 4-gram may start here
            if len(starts):
                four = (three[starts] << 8) | b[starts + 3]
                pos = np.minimum(np.searchsorted(self.quad_keys, four), len(self.quad_keys) - 1)
                found.append(self.quad_features[pos[self.quad_keys[pos] == four]])
        ids = np.concatenate(found)
        counts = np.bincount(ids[ids >= 0], minlength=self.num_features)
        present = np.flatnonzero(counts)
        return present, counts[present]

    def classify(self, text: str) -> tuple[str, float]:
        ids, counts = self.features_of(text.encode("utf-8", errors="surrogatepass"))
        scores = counts.astype(np.float32) @ self.ptc[ids] + self.pc
        best = int(np.argmax(scores))
        with np.errstate(over="ignore"):
            return self.classes[best], float(1.0 / np.exp(scores - scores[best]).sum())


MAX_NGRAM = 4
_PREFIX = 1 << 13


@lru_cache(maxsize=1)
def _identifier() -> NgramClassifier:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    load = getattr(LanguageIdentifier, "from_pickled_model", None) or LanguageIdentifier.from_model_file
    model = load(MODEL_FILE, norm_probs=True)
    return NgramClassifier(model.nb_ptc, model.nb_pc, model.nb_classes, model.tk_nextmove, model.tk_output)


def _classify(text: str) -> tuple[str, float]:
    return _identifier().classify(text[:MAX_CHARS])


def identify(text: str, min_share: float = 0.2,
             toks: list[str] | None = None) -> tuple[str, float, dict[str, float]]:
    """``(language, probability, shares)``. ``shares`` maps each language found to its share of the text's
    tokens (``clean.tokens``: CJK characters and words of other scripts; ``toks`` when already known). The CJK
    part and the rest are classified apart when each holds at least ``min_share`` (two entries then); a smaller
    part is left out."""
    toks = tokens(text) if toks is None else toks
    words = len(toks) - sum(map(str.isdigit, toks))  # numbers say nothing of the language
    if not words:
        return "und", 0.0, {}
    cjk_chars = _CJK_CHAR.findall(text)  # each one a token of its own
    cjk = len(cjk_chars) - sum(map(str.isdigit, cjk_chars))
    parts = []
    if cjk / words >= min_share:
        parts.append((" ".join(_CJK_RUN.findall(text)) if cjk < words else text, cjk / words))
    if (words - cjk) / words >= min_share:
        parts.append((_CJK_RUN.sub(" ", text) if cjk else text, (words - cjk) / words))
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
    known = batch.get("tokens") or [None] * len(reasons)  # filter_batch's, when it ran
    for i, text in enumerate(batch["text"]):
        if reasons[i] is not None:
            langs.append(None)
            scores.append(None)
            continue
        lang, score, shares = identify(text, cfg.min_language_share, known[i])
        langs.append(lang)
        scores.append(round(score, 4))
        if wanted and not any(share >= cfg.min_language_share and code in wanted for code, share in shares.items()):
            found = ", ".join(f"{code} {share:.2f}" for code, share in sorted(shares.items(), key=lambda kv: -kv[1]))
            reasons[i] = "language"
            details[i] = f"{found or 'no letters'} (p {score:.2f}); data.languages {sorted(wanted)}"
    return {**batch, "lang": langs, "lang_score": scores, "reject_reason": reasons, "reject_detail": details}
