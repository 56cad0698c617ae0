"""Two per-document steps of the corpus pipeline against their baselines, same texts, one process, one run.

    python bench/minhash_langid.py [--docs 1000]

* MinHash: ``dedup.signatures`` (shingle hashes in NumPy, rensa's Rust min over 128 seeded permutations, the
  batch in one call; the shingle hashing, common to both, is timed apart too) against the NumPy matrix of multiply-shift hashes the pipeline used before (each text's
  distinct shingle hashes times 128 odd multipliers plus offsets, top 32 bits, column minimum), fed the same
  shingle hashes. Both estimate Jaccard; the figure checked beside the time is how far each estimate is from
  the true 5-shingle Jaccard on pairs of lightly edited documents.
* Language ID: ``language.NgramClassifier`` (langid.py's model, features found with NumPy lookups) against
  py3langid 0.3's own ``classify`` on the same first 1000 characters; the languages must agree.

Texts: documents of the bundled sample corpus (Debian Reference, English and Chinese), repeated to ``--docs``.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge.config import DedupConfig  # noqa: E402
from llmforge.data import language  # noqa: E402
from llmforge.data.dedup import shingle_hashes, signatures  # noqa: E402
from llmforge.samples import sample_file  # noqa: E402


def numpy_signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """The baseline: multiply-shift permutations of each text's distinct shingle hashes, in NumPy."""
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
    hashes, offsets = shingle_hashes(texts, cfg.shingle_size)
    out = np.empty((len(texts), cfg.num_perm), np.uint32)
    with np.errstate(over="ignore"):
        for i in range(len(texts)):
            shingles = np.unique(hashes[offsets[i]:offsets[i + 1]])
            sig = np.full(cfg.num_perm, np.iinfo(np.uint32).max, np.uint64)
            for start in range(0, len(shingles), 4096):
                chunk = shingles[start:start + 4096, None]
                sig = np.minimum(sig, ((chunk * a + b) >> np.uint64(32)).min(axis=0))
            out[i] = sig
    return out


def sample_texts() -> list[str]:
    texts = []
    for line in gzip.open(sample_file("corpus.jsonl.gz"), "rt", encoding="utf-8"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("text"), str) and len(record["text"]) >= 200:
            texts.append(record["text"])
    return texts


def jaccard(a: str, b: str, k: int) -> float:
    def grams(t: str) -> set[str]:
        t = " ".join(t.lower().split())
        return {t[i:i + k] for i in range(len(t) - k + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def edit(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(max(1, len(chars) // 50)):
        chars[rng.randrange(len(chars))] = rng.choice("abcdefghij ")
    return "".join(chars)


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    args = parser.parse_args()
    base = sample_texts()
    texts = (base * (args.docs // len(base) + 1))[:args.docs]
    cfg = DedupConfig()

    shingle_s, _ = best_of(lambda: shingle_hashes(texts, cfg.shingle_size))
    rensa_s, ours = best_of(lambda: signatures(texts, cfg))
    numpy_s, theirs = best_of(lambda: numpy_signatures(texts, cfg))
    rng = random.Random(3)
    pairs = [(t, edit(t, rng)) for t in rng.sample(base, 100)]
    left, right = [a for a, _ in pairs], [b for _, b in pairs]
    truth = np.array([jaccard(a, b, cfg.shingle_size) for a, b in pairs])
    error = {}
    for name, fn in (("rensa", signatures), ("numpy", numpy_signatures)):
        estimate = (fn(left, cfg) == fn(right, cfg)).mean(axis=1)
        error[name] = round(float(np.abs(estimate - truth).mean()), 4)

    head = [t[:language.MAX_CHARS] for t in texts]
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    load = getattr(LanguageIdentifier, "from_pickled_model", None) or LanguageIdentifier.from_model_file
    reference = load(MODEL_FILE, norm_probs=True)
    t0 = time.perf_counter()
    classifier = language.NgramClassifier(reference.nb_ptc, reference.nb_pc, reference.nb_classes,
                                          reference.tk_nextmove, reference.tk_output)
    build_s = time.perf_counter() - t0
    ours_s, langs = best_of(lambda: [classifier.classify(t)[0] for t in head])
    ref_s, ref_langs = best_of(lambda: [reference.classify(t)[0] for t in head])
    agree = sum(a == b for a, b in zip(langs, ref_langs)) / len(head)

    print(json.dumps({
        "bench": "minhash_langid", "docs": len(texts), "mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
        "minhash": {"rensa_s": round(rensa_s, 3), "numpy_s": round(numpy_s, 3),
                    "rensa_over_numpy": round(numpy_s / rensa_s, 1), "shingle_hashes_s": round(shingle_s, 3),
                    "permutations_rensa_over_numpy": round((numpy_s - shingle_s) / (rensa_s - shingle_s), 1),
                    "mean_abs_jaccard_error": error, "pairs": len(pairs),
                    "mean_true_jaccard": round(float(truth.mean()), 3)},
        "langid": {"vectorised_s": round(ours_s, 3), "py3langid_s": round(ref_s, 3),
                   "vectorised_over_py3langid": round(ref_s / ours_s, 1), "build_s": round(build_s, 2),
                   "same_language": round(agree, 4)},
    }))


if __name__ == "__main__":
    main()
