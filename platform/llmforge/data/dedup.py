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


def shingle_hashes(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of the character k-shingles of each text (lower-cased, spaces folded), all texts in
    one flat array, and the row offsets (``len(texts) + 1``) where each text's shingles start. A text shorter
    than ``k`` is one shingle, padded. Computed for the whole batch at once: one rolling hash over the texts'
    code points laid end to end, the windows that cross from one text into the next left out."""
    folded = [" ".join(text.lower().split()).ljust(k, "\0") for text in texts]
    lengths = np.fromiter((len(t) for t in folded), np.int64, count=len(folded))
    codes = np.frombuffer("".join(folded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    windows = len(codes) - k + 1
    h = np.zeros(max(windows, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):  # polynomial rolling hash over k code points, modulo 2**64
        for j in range(k):
            h = h * _BASE + codes[j:j + windows]
    counts = lengths - k + 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
    return h[keep], offsets


_BASE = np.uint64(1099511628211)


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures, one row of ``num_perm`` uint32 per text, over its character shingles: rensa's
    (Rust) min over ``num_perm`` seeded hash permutations of the shingle hashes, the whole batch in one call
    (bench/minhash_langid.py: about 5x NumPy's matrix of multiply-shift hashes, the same estimate)."""
    if not texts:
        return np.zeros((0, cfg.num_perm), np.uint32)
    from rensa import RMinHash

    hashes, offsets = shingle_hashes(texts, cfg.shingle_size)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, cfg.num_perm, cfg.seed)
    return np.array(matrix.to_rows(), dtype=np.uint32)


def minhash(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash signature (``num_perm`` uint32) of one text."""
    return signatures([text], cfg)[0]


# A pair exactly at the threshold becomes a candidate at least this often (one above it, more often still).
MIN_CANDIDATE_RATE = 0.9


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)``, bands*rows <= num_perm: the most rows per band (the fewest chance candidates) with which
    a pair at ``threshold`` still shares a bucket with probability ``MIN_CANDIDATE_RATE``; with 128 permutations
    21 x 6 for 0.7 (0.928 at 0.7, 0.998 at 0.8) and 16 x 8 for 0.8 (0.947 at 0.8, 0.994 at 0.85). Candidates
    are verified against the threshold, so a looser banding costs comparisons, not false merges; a tighter one
    misses duplicates. (It used to balance the
    S-curve's false positives against its false negatives, 9 x 14, which found a pair at 0.85 only 62% of the
    time.)"""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= MIN_CANDIDATE_RATE:
            return bands, rows
    return num_perm, 1


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit bucket key per band and signature (``sigs``: n x num_perm): the band's ``rows``
    values folded by multiply-xorshift, with the band index mixed in, so equal bands of different positions
    never share a key."""
    n = len(sigs)
    values = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.broadcast_to((np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _GOLDEN, (n, bands)).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            h = _mix(h ^ values[:, :, j])
    return h.view(np.int64)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def similarity(sig_a: bytes, sig_b: bytes) -> float:
    """Fraction of equal MinHash positions: an unbiased estimate of the Jaccard similarity."""
    a = np.frombuffer(sig_a, dtype=np.uint32)
    b = np.frombuffer(sig_b, dtype=np.uint32)
    return np.count_nonzero(a == b) / len(a)  # np.mean's reduction machinery costs 3x this on 128 values


def _similar(seen: dict, a: int, b: int, sig_a: bytes, sig_b: bytes, threshold: float) -> bool:
    key = (a, b)
    if key not in seen:
        seen[key] = similarity(sig_a, sig_b) >= threshold
    return seen[key]


def signature_batch(batch: dict[str, list], cfg: DedupConfig) -> dict[str, list]:
    """Add ``exact_hash``, ``signature`` (bytes) and ``buckets`` for kept rows; rejected rows get empties."""
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    n = len(batch["text"])
    kept = [i for i, reason in enumerate(batch["reject_reason"]) if reason is None]
    exact = [0] * n
    sigs: list[bytes] = [b""] * n
    buckets: list[list[int]] = [[] for _ in range(n)]
    for i in kept:
        exact[i] = text_hash(batch["text"][i])
    if cfg.near and kept:
        matrix = signatures([batch["text"][i] for i in kept], cfg)
        keys = band_keys(matrix, bands, rows).tolist()
        for row, i in enumerate(kept):
            sigs[i] = matrix[row].tobytes()
            buckets[i] = keys[row]
    return {**batch, "exact_hash": exact, "signature": sigs, "buckets": buckets}


def duplicates_in_bucket(group: dict[str, list], cfg: DedupConfig, seen: dict | None = None) -> dict[str, list]:
    """Rows of one bucket -> the duplicates found in it: ``order``, ``duplicate_of``, ``kind``.

    Members are visited in input order; each is compared with the bucket's representatives so far
    (documents not found to be duplicates). A member equal to a representative (same exact hash) is
    an exact duplicate; one whose estimated similarity reaches the threshold is a near duplicate.
    ``seen``: similarities already computed, by pair of orders, shared by the buckets of one partition (a near
    pair shares most of its band buckets: without it the same pair was compared up to once per band).
    """
    seen = {} if seen is None else seen
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
            if cfg.near and sig and rep_sig and _similar(seen, rep_order, order, rep_sig, sig, cfg.threshold):
                match = ("near_duplicate", rep_order)
                break
        if match is None:
            reps.append((order, exact, sig))
        elif match != "self":
            out["order"].append(order)
            out["duplicate_of"].append(match[1])
            out["kind"].append(match[0])
    return out
