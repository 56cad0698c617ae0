"""Training batches by global position: every sequence has a fixed place in a seeded order, so a resumed
run (on any number of workers) continues exactly where its checkpoint left the data.

The order of an epoch: the Parquet row groups of the split in a seeded random order, and the rows of each
group in a seeded random order (a block shuffle: one row group is read at a time, from local disk or S3).
Position ``i`` of the whole run is row ``order(i % N)`` of epoch ``i // N``. A global micro-batch is ``W * B``
consecutive positions for ``W`` workers of micro-batch ``B``; worker ``r`` takes the ``r``-th slice of ``B``.
A checkpoint stores ``samples_consumed``, the next position, which does not depend on ``W``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
import torch

from llmforge import storage


class TokenShards:
    """The sequences of one split (``tokens/train``, an SFT split, ...) by position in a seeded order."""

    def __init__(self, uri: str, seed: int, columns: tuple[str, ...] = ("input_ids", "labels")):
        self.uri, self.seed = uri, seed
        fs, _ = storage.resolve(uri)
        self._fs = fs
        self._groups: list[tuple[str, int, int]] = []  # (path, row group, rows)
        names: list[str] = []
        for file_uri in storage.list_files(uri):
            if not file_uri.endswith(".parquet"):
                continue
            path = storage.resolve(file_uri)[1]
            meta = pq.ParquetFile(path, filesystem=fs).metadata
            names = names or meta.schema.to_arrow_schema().names
            self._groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                             if meta.row_group(g).num_rows > 0]
        if not self._groups:
            raise RuntimeError(f"no sequences under {uri}")
        self.columns = tuple(c for c in columns if c in names)
        self.num_rows = sum(rows for _, _, rows in self._groups)
        self._read_group = lru_cache(maxsize=2)(self._read_group_uncached)
        self._epoch_order = lru_cache(maxsize=2)(self._epoch_order_uncached)
        self._row_order = lru_cache(maxsize=4)(self._row_order_uncached)

    def __len__(self) -> int:
        return self.num_rows

    def _epoch_order_uncached(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s row groups in their shuffled order, and the first position of each."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._groups))
        sizes = np.array([self._groups[g][2] for g in order])
        return order, np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def _row_order_uncached(self, epoch: int, group: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, group]).permutation(self._groups[group][2])

    def _read_group_uncached(self, group: int) -> dict[str, np.ndarray]:
        path, index, _ = self._groups[group]
        table = pq.ParquetFile(path, filesystem=self._fs).read_row_group(index, columns=list(self.columns))
        return {c: np.stack(table.column(c).to_numpy(zero_copy_only=False)) for c in self.columns}

    def rows(self, positions: range) -> dict[str, np.ndarray]:
        """The sequences at these global positions (any range, across epochs)."""
        out: dict[str, list] = {c: [] for c in self.columns}
        for position in positions:
            epoch, offset = divmod(position, self.num_rows)
            order, starts = self._epoch_order(epoch)
            slot = int(np.searchsorted(starts, offset, side="right") - 1)
            group = int(order[slot])
            row = self._row_order(epoch, group)[offset - starts[slot]]
            data = self._read_group(group)
            for c in self.columns:
                out[c].append(data[c][row])
        return {c: np.stack(v) for c, v in out.items()}


def worker_batch(shards: TokenShards, position: int, rank: int, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Worker ``rank``'s micro-batch of the global micro-batch that starts at ``position`` (the whole one
    spans ``world_size * micro_batch_size`` positions; the caller advances ``position`` by that). Integer
    columns become int64 tensors, float ones float32; pretraining shards, which have no ``labels``, get their
    ``input_ids`` as labels."""
    start = position + rank * micro_batch_size
    data = shards.rows(range(start, start + micro_batch_size))
    batch = {c: torch.as_tensor(v, dtype=torch.long if np.issubdtype(v.dtype, np.integer) else torch.float32)
             for c, v in data.items()}
    if "input_ids" in batch and "labels" not in batch:
        batch["labels"] = batch["input_ids"]
    return batch
