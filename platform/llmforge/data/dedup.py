"""Exact and near-duplicate detection: MinHash over character shingles, LSH banding, verification.

Per document (a pure, vectorized map step): a 64-bit hash of the text for exact matches, a MinHash
signature over its character k-shingles, and one bucket key per LSH band. Documents that share a
bucket are candidates; a candidate counts as a near duplicate only when the signatures agree on at
least ``threshold`` of their positions (the MinHash estimate of Jaccard similarity), so two documents
that merely share a footer are not merged. Within a bucket the document that came first in the input
(smallest ``order``) is kept, which makes the result independent of how the work was partitioned.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from llmforge.config import DedupConfig

EXACT_BAND = -1
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def text_hash(text: str) -> int:
    """A signed 64-bit hash of the text (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """Distinct 64-bit hashes of the character k-shingles of ``text`` (lower-cased, spaces folded)."""
    text = " ".join(text.lower().split())
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < k:
        codes = np.concatenate([codes, np.zeros(k - len(codes), dtype=np.uint64)])
    # Polynomial rolling hash over k code points, wrapping modulo 2**64.
    base = np.uint64(1099511628211)
    h = np.zeros(len(codes) - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * base + codes[j:len(codes) - k + 1 + j]
    return np.unique(h)


def minhash(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash signature (``num_perm`` uint32) with multiply-shift hashing of the shingle hashes."""
    a, b = _permutations(cfg.num_perm, cfg.seed)
    shingles = shingle_hashes(text, cfg.shingle_size)
    sig = np.full(cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingles), 4096):  # bounds the temporary matrix for long documents
            chunk = shingles[start:start + 4096, None]
            sig = np.minimum(sig, ((chunk * a + b) >> np.uint64(32)).min(axis=0))
    return sig.astype(np.uint32)


# A pair exactly at the threshold becomes a candidate at least this often (one above it, more often still).
MIN_CANDIDATE_RATE = 0.9


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)``, bands*rows <= num_perm: the most rows per band (the fewest chance candidates) with which
    a pair at ``threshold`` still shares a bucket with probability ``MIN_CANDIDATE_RATE``: 16 x 8 for 0.8 and
    128 permutations (0.947 at 0.8, 0.994 at 0.85). Candidates are verified against the threshold, so a looser
    banding costs comparisons, not false merges; a tighter one misses duplicates. (It used to balance the
    S-curve's false positives against its false negatives, 9 x 14, which found a pair at 0.85 only 62% of the
    time.)"""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= MIN_CANDIDATE_RATE:
            return bands, rows
    return num_perm, 1


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One signed 64-bit bucket key per band; the band index is part of the key."""
    keys = []
    for band in range(bands):
        chunk = sig[band * rows:(band + 1) * rows].tobytes()
        digest = hashlib.blake2b(chunk, digest_size=8, person=band.to_bytes(4, "little") * 4).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return keys


def similarity(sig_a: bytes, sig_b: bytes) -> float:
    """Fraction of equal MinHash positions: an unbiased estimate of the Jaccard similarity."""
    a = np.frombuffer(sig_a, dtype=np.uint32)
    b = np.frombuffer(sig_b, dtype=np.uint32)
    return float(np.mean(a == b))


def signature_batch(batch: dict[str, list], cfg: DedupConfig) -> dict[str, list]:
    """Add ``exact_hash``, ``signature`` (bytes) and ``buckets`` for kept rows; rejected rows get empties."""
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    exact, sigs, buckets = [], [], []
    for text, reason in zip(batch["text"], batch["reject_reason"]):
        if reason is not None:
            exact.append(0)
            sigs.append(b"")
            buckets.append([])
            continue
        exact.append(text_hash(text))
        if cfg.near:
            sig = minhash(text, cfg)
            sigs.append(sig.tobytes())
            buckets.append(band_keys(sig, bands, rows))
        else:
            sigs.append(b"")
            buckets.append([])
    return {**batch, "exact_hash": exact, "signature": sigs, "buckets": buckets}


def duplicates_in_bucket(group: dict[str, list], cfg: DedupConfig) -> dict[str, list]:
    """Rows of one bucket -> the duplicates found in it: ``order``, ``duplicate_of``, ``kind``.

    Members are visited in input order; each is compared with the bucket's representatives so far
    (documents not found to be duplicates). A member equal to a representative (same exact hash) is
    an exact duplicate; one whose estimated similarity reaches the threshold is a near duplicate.
    """
    members = sorted(zip(group["order"], group["exact_hash"], group["signature"]))
    out: dict[str, list] = {"order": [], "duplicate_of": [], "kind": []}
    reps: list[tuple[int, int, bytes]] = []
    for order, exact, sig in members:
        match = None
        for rep_order, rep_exact, rep_sig in reps:
            if rep_order == order:
                match = "self"
                break
            if cfg.exact and rep_exact == exact:
                match = ("exact_duplicate", rep_order)
                break
            if cfg.near and sig and rep_sig and similarity(sig, rep_sig) >= cfg.threshold:
                match = ("near_duplicate", rep_order)
                break
        if match is None:
            reps.append((order, exact, sig))
        elif match != "self":
            out["order"].append(order)
            out["duplicate_of"].append(match[1])
            out["kind"].append(match[0])
    return out
