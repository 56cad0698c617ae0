"""Tokenize documents and pack them into fixed-length training sequences, EOS between documents."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from llmforge import storage
from llmforge.data import tokenizer as tokenizer_lib

SEQUENCE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])


def split_of(order: int, val_fraction: float, seed: int) -> str:
    """``"val"`` for a stable ``val_fraction`` of documents, ``"train"`` for the rest (document level,
    so no document is split across train and validation)."""
    digest = hashlib.blake2b(f"{seed}:{order}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def pack_tokens(leftover: list[int], documents: list[list[int]], seq_len: int, eos_id: int) -> tuple[list[list[int]], list[int]]:
    """Append each document and an EOS to ``leftover``; cut full ``seq_len`` sequences off the front."""
    stream = list(leftover)
    for ids in documents:
        stream.extend(ids)
        stream.append(eos_id)
    full = len(stream) // seq_len * seq_len
    return [stream[i:i + seq_len] for i in range(0, full, seq_len)], stream[full:]


class Packer:
    """Ray Data actor: loads the tokenizer once and packs both splits in one pass over the documents, each
    split carrying its unfilled tail from batch to batch. It writes its sequences itself, to
    ``<tokens_uri>/<split>/part-<first order>.parquet`` (named after the batch, so a retried batch replaces its
    file instead of adding one), and returns one row per split with the count."""

    def __init__(self, tokenizer_uri: str, seq_len: int, tokens_uri: str, val_fraction: float, seed: int):
        self.tok = tokenizer_lib.load_fast(tokenizer_uri)
        self.eos_id = tokenizer_lib.token_id(self.tok, tokenizer_lib.EOS, tokenizer_uri)
        self.seq_len = seq_len
        self.tokens_uri = tokens_uri
        self.val_fraction, self.seed = val_fraction, seed
        self.leftover: dict[str, list[int]] = {"train": [], "val": []}

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        orders = batch.column("order").to_pylist()
        encoded = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        by_split: dict[str, list[list[int]]] = {"train": [], "val": []}
        for order, ids in zip(orders, encoded):
            by_split[split_of(order, self.val_fraction, self.seed)].append(ids)
        counts = {"split": [], "sequences": []}
        for split, docs in by_split.items():
            sequences, self.leftover[split] = pack_tokens(self.leftover[split], docs, self.seq_len, self.eos_id)
            if sequences:
                storage.write_parquet(storage.join(self.tokens_uri, split, f"part-{min(orders):020d}.parquet"),
                                      pa.Table.from_pydict({"input_ids": sequences}, schema=SEQUENCE_SCHEMA))
            counts["split"].append(split)
            counts["sequences"].append(len(sequences))
        return pa.table(counts)
