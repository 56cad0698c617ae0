"""Training data by global position: a fixed, seeded order that does not depend on the worker count."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmforge.train.data import TokenShards, worker_batch


@pytest.fixture()
def split(tmp_path):
    """103 sequences whose first token is their id, in 3 files of uneven row groups."""
    ids = iter(range(103))
    for name, sizes in {"a": [10, 25], "b": [40], "c": [7, 21]}.items():
        tables = [pa.table({"input_ids": [[next(ids), 1, 2, 3] for _ in range(n)]}) for n in sizes]
        with pq.ParquetWriter(tmp_path / f"{name}.parquet", tables[0].schema) as writer:
            for t in tables:
                writer.write_table(t)
    return tmp_path


def _first_tokens(shards, positions):
    return shards.rows(positions)["input_ids"][:, 0].tolist()


def test_each_epoch_is_a_permutation_and_epochs_differ(split):
    shards = TokenShards(str(split), seed=7)
    assert len(shards) == 103 and shards.columns == ("input_ids",)
    epoch0 = _first_tokens(shards, range(0, 103))
    epoch1 = _first_tokens(shards, range(103, 206))
    assert sorted(epoch0) == sorted(epoch1) == list(range(103))
    assert epoch0 != epoch1 and epoch0 != list(range(103))
    assert _first_tokens(TokenShards(str(split), seed=7), range(0, 103)) == epoch0  # same seed, same order
    assert _first_tokens(TokenShards(str(split), seed=8), range(0, 103)) != epoch0


def test_workers_split_global_batches_the_same_for_any_world_size(split):
    """2 workers x micro 4 and 1 worker x micro 8 over the same global positions see the same sequences,
    and resuming from a position continues exactly where the first run stopped."""
    shards = TokenShards(str(split), seed=1)
    two = []
    for position in range(0, 48, 8):
        two += [worker_batch(shards, position, r, 4)["input_ids"][:, 0].tolist() for r in range(2)]
    one = [worker_batch(shards, position, 0, 8)["input_ids"][:, 0].tolist() for position in range(0, 48, 8)]
    assert [a + b for a, b in zip(two[::2], two[1::2])] == one
    seen = [t for batch in one for t in batch]
    assert len(set(seen)) == 48  # nothing twice within an epoch
    resumed = worker_batch(TokenShards(str(split), seed=1), 48, 0, 8)["input_ids"][:, 0].tolist()
    assert not set(resumed) & set(seen) and resumed == _first_tokens(shards, range(48, 56))
    batch = worker_batch(shards, 0, 1, 4)
    assert batch["labels"].equal(batch["input_ids"]) and batch["input_ids"].dtype.is_floating_point is False


def test_labels_are_kept_when_present(tmp_path):
    pq.write_table(pa.table({"input_ids": [[5, 6, 7]] * 4, "labels": [[-100, 6, 7]] * 4}), tmp_path / "x.parquet")
    batch = worker_batch(TokenShards(str(tmp_path), seed=0), 0, 0, 2)
    assert batch["labels"][:, 0].tolist() == [-100, -100] and batch["input_ids"].shape == (2, 3)
    assert np.array_equal(batch["input_ids"][0].numpy(), [5, 6, 7])


def test_no_data_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no sequences"):
        TokenShards(str(tmp_path), seed=0)
