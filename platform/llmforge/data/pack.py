"""Tokenize documents and pack them into fixed-length training sequences, EOS between documents."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import pyarrow as pa

from llmforge import storage
from llmforge.data import tokenizer as tokenizer_lib

SEQUENCE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])


def split_of(order: int, val_fraction: float, seed: int) -> str:
    """``"val"`` for a stable ``val_fraction`` of documents, ``"train"`` for the rest (document level,
    so no document is split across train and validation)."""
    digest = hashlib.blake2b(f"{seed}:{order}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def token_stream(documents: list[list[int]], eos_id: int, leftover: list[int] = ()) -> np.ndarray:
    """``leftover`` then each document followed by an EOS, end to end, as one int32 array."""
    stream = np.empty(len(leftover) + sum(len(ids) + 1 for ids in documents), np.int32)
    stream[:len(leftover)] = leftover
    at = len(leftover)
    for ids in documents:
        stream[at:at + len(ids)] = ids
        stream[at + len(ids)] = eos_id
        at += len(ids) + 1
    return stream


def pack_tokens(leftover: list[int], documents: list[list[int]], seq_len: int, eos_id: int) -> tuple[list[list[int]], list[int]]:
    """Append each document and an EOS to ``leftover``; cut full ``seq_len`` sequences off the front."""
    stream = token_stream(documents, eos_id, leftover)
    full = len(stream) // seq_len * seq_len
    return stream[:full].reshape(-1, seq_len).tolist(), stream[full:].tolist()


@lru_cache(maxsize=2)
def _tokenizer(uri: str):
    """The tokenizer and its EOS id, loaded once per worker process."""
    tok = tokenizer_lib.load_fast(uri)
    return tok, tokenizer_lib.token_id(tok, tokenizer_lib.EOS, uri)


def write_sequences(uri: str, stream: np.ndarray, seq_len: int) -> int:
    """Write the whole ``seq_len`` sequences at the front of ``stream`` (int32 token ids) to one Parquet file;
    their count."""
    n = len(stream) // seq_len
    if n:
        offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(stream[:n * seq_len]))
        storage.write_parquet(uri, pa.Table.from_arrays([column], schema=SEQUENCE_SCHEMA))
    return n


def pack_block(table: pa.Table, tokenizer_uri: str, seq_len: int, tokens_uri: str, val_fraction: float,
               seed: int) -> dict[str, tuple[int, list[int]]]:
    """Tokenize one block of clean documents (``order``, ``text``) and pack each split: its documents end to end,
    an EOS after each, cut into ``seq_len`` sequences written to ``<tokens_uri>/<split>/part-<first order>.parquet``
    (named after the block, so a retried block replaces its file). Per split: ``(sequences written, the tail)``,
    the tail (fewer than ``seq_len`` tokens) for :func:`pack_tails` to join with the other blocks' tails."""
    tok, eos = _tokenizer(tokenizer_uri)
    orders = table.column("order").to_pylist()
    encoded = tok.encode_batch(table.column("text").to_pylist(), add_special_tokens=False)
    name = f"part-{min(orders):020d}.parquet" if orders else "part-empty.parquet"
    by_split: dict[str, list[list[int]]] = {"train": [], "val": []}
    for order, e in zip(orders, encoded):
        by_split[split_of(order, val_fraction, seed)].append(e.ids)
    out = {}
    for split, docs in by_split.items():
        stream = token_stream(docs, eos)
        n = write_sequences(storage.join(tokens_uri, split, name), stream, seq_len)
        out[split] = (n, stream[n * seq_len:].tolist())
    return out


def pack_tails(tails: dict[str, list[list[int]]], seq_len: int, tokens_uri: str) -> dict[str, int]:
    """The blocks' tails of each split, joined in block order, packed into ``<split>/part-tails.parquet``; the
    sequences written per split (the last partial sequence is dropped, as at the end of any stream)."""
    written = {}
    for split, parts in tails.items():
        stream = np.array([t for tail in parts for t in tail], np.int32)
        written[split] = write_sequences(storage.join(tokens_uri, split, "part-tails.parquet"), stream, seq_len)
    return written
