"""The corpus pipeline: read → normalize → filter → mask PII → dedup → tokenizer → pack, as tasks of one CPU on
Ray or, for a small input with no cluster asked for, in local processes (:mod:`executor`, ``data.executor``).

Everything streams: each task reads its piece of the input a batch at a time and writes Parquet itself, so
memory is bounded by the batch size, not the corpus, and no row passes through the driver. The passes:

1. a task per piece (a file, or a byte range of a large JSONL file, :func:`plan_pieces`): read,
   normalize, filter, decontaminate (``data.decontaminate``), identify the language, mask and sign (MinHash)
   every record → ``_work/records`` (Parquet);
2. shuffle the bucket keys (only the key columns are read) by hash partition and find duplicates inside each
   partition → a drop list (order, duplicate_of, kind: about 17 bytes per duplicate, the only thing the driver
   collects);
3. one pass over the records, a task per pass-1 file: mark the duplicates, write ``clean/`` and
   ``rejects/`` and count (each block writes its own two files); with ``data.tokenizer.path`` the kept rows
   are tokenized and packed into ``tokens/{train,val}/`` here too;
4. otherwise train the tokenizer on ``clean/``, then tokenize and pack both splits in one pass over it (a Ray
   task per file). Each block's unfilled tails are joined by the driver, in input order.

The result is built under ``<output>.partial-<id>`` and moved into place at the end, ``manifest.json``
last, so an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmforge import storage
from llmforge.config import Config, DataConfig, DedupConfig, dump_config
from llmforge.data import clean, decontam, dedup, executor, language, pii, sources
from llmforge.data import tokenizer as tokenizer_lib
from llmforge.data.pack import pack_block, pack_tails, split_of
from llmforge.errors import InputError, OutputExistsError
from llmforge.lease import Lease
from llmforge.runtime import ensure_ray

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATASET_FORMAT = "llmforge.dataset/v1"
STAGE_SCHEMA = sources.RECORD_SCHEMA.append(pa.field("pii", pa.string())).append(
    pa.field("exact_hash", pa.int64())).append(pa.field("signature", pa.binary())).append(
    pa.field("buckets", pa.list_(pa.int64()))).append(pa.field("lang", pa.string())).append(
    pa.field("lang_score", pa.float32()))
BUCKET_SCHEMA = pa.schema([("part", pa.int64()), ("bucket", pa.int64()), ("order", pa.int64()),
                           ("exact_hash", pa.int64())])
BUCKET_SCHEMA_BYTES = 8 * len(BUCKET_SCHEMA)  # a bucket row: four int64 columns
SIGNATURE_SCHEMA = pa.schema([("order", pa.int64()), ("signature", pa.binary())])
DUP_SCHEMA = pa.schema([("order", pa.int64()), ("duplicate_of", pa.int64()), ("kind", pa.string())])
CLEAN_COLUMNS = ["id", "text", "meta", "source", "order", "pii", "lang", "lang_score"]
DEDUP_REDUCE_BYTES = 256 << 20  # what one reduce task of the duplicate search holds at most: bucket rows, signatures
MAX_DEDUP_PARTITIONS = 1024
DOCS_PER_DEDUP_MAP = 200_000  # a map task holds its documents' key columns (about 0.7 KB each) at once


ROWS_PER_RECORD_FILE = 4096  # pass 1 writes a file per this many rows of a piece; pass 3 reads one whole


def process_batch(table: pa.Table, cfg: DataConfig, eval_ngrams: decontam.EvalNgrams | None = None) -> pa.Table:
    """Pass 1 on one block: normalize, filter, decontaminate, identify the language, mask, sign. Pure; rejected
    rows are kept, marked."""
    batch = table.to_pydict()
    batch = clean.normalize_batch(batch, cfg)
    batch = clean.filter_batch(batch, cfg)
    if eval_ngrams is not None:  # before masking: the evaluation items hold no PII placeholders
        batch = decontam.decontaminate_batch(batch, eval_ngrams)
    batch = language.language_batch(batch, cfg)
    batch = pii.mask_batch(batch, pii.PiiMasker(cfg.pii), cfg.pii.meta)
    batch = dedup.signature_batch(batch, cfg.dedup)
    batch.pop("tokens")  # the filter's, shared with decontamination and language ID; not kept
    return pa.Table.from_pydict(batch, schema=STAGE_SCHEMA)


def plan_pieces(tasks, paths: list[str], fs, cfg: DataConfig) -> list[sources.Piece]:
    """The read tasks of pass 1: a piece per file, and a file that can be read in byte ranges
    (:func:`sources.splittable`) and is larger than ``data.read_range_mb`` cut into equal ranges; the newlines
    before each range, which number its lines, are counted by tasks (a pass over those bytes, no parsing)."""
    range_bytes = cfg.read_range_mb << 20
    sizes = [info.size or 0 for info in fs.get_file_info(paths)]
    ranges = {i: sources.byte_ranges(size, range_bytes) for i, (path, size) in enumerate(zip(paths, sizes))
              if sources.splittable(path, cfg) and size > range_bytes}
    to_count = [(paths[i], start, end) for i, rs in ranges.items() for start, end in rs[:-1]]
    counts = iter(row["newlines"] for row in tasks.map(_count_newlines, to_count, fs, what="counting lines"))
    pieces = []
    for i, path in enumerate(paths):
        if i not in ranges:
            pieces.append(sources.Piece(path, i))
            continue
        before = 0
        for part, (start, end) in enumerate(ranges[i]):
            pieces.append(sources.Piece(path, i, start, end, before, part))
            before += next(counts) if part < len(ranges[i]) - 1 else 0
    return pieces


def _count_newlines(chunk: list[tuple[str, int, int]], fs) -> list[dict]:
    rows = []
    for path, start, end in chunk:
        with fs.open_input_file(path) as f:
            rows.append({"newlines": sources.count_newlines(f, start, end)})
    return rows


def _read_pieces(pieces: list[sources.Piece], fs, cfg: DataConfig, eval_ngrams, out_fs, records_dir: str) -> list[dict]:
    """Pass 1 as a task over some pieces: read, :func:`process_batch` a batch at a time, and write
    the records to Parquet files of at most :data:`ROWS_PER_RECORD_FILE` rows (named after the piece, so a
    retried task replaces its files), streamed: the task holds one batch. Its records' count per piece."""
    out = []
    for piece in pieces:
        rows = files = in_file = 0
        writer = None
        try:
            for block in sources.read_blocks(fs, piece, cfg):
                table = process_batch(block, cfg, eval_ngrams)
                if writer is None or in_file >= ROWS_PER_RECORD_FILE:
                    if writer is not None:
                        writer.close()
                    name = f"part-{piece.index:06d}-{piece.part:05d}-{files:05d}.parquet"
                    writer = pq.ParquetWriter(f"{records_dir}/{name}", STAGE_SCHEMA, filesystem=out_fs)
                    files, in_file = files + 1, 0
                writer.write_table(table)
                rows, in_file = rows + table.num_rows, in_file + table.num_rows
        finally:
            if writer is not None:
                writer.close()
        out.append({"records": rows})
    return out


def bucket_rows(table: pa.Table, cfg: DedupConfig, partitions: int) -> pa.Table:
    """One row per (bucket, kept document), vectorised: the exact hash is a bucket of its own, then the LSH band
    keys; ``part`` is the bucket's hash partition. The signatures travel apart (:func:`signature_rows`): a
    document has a bucket row per band, and 21 copies of its 512-byte signature were most of the shuffle."""
    table = table.filter(pc.is_null(table.column("reject_reason")))
    n = table.num_rows
    rows, keys = [], []
    if cfg.exact:
        rows.append(np.arange(n))
        keys.append(table.column("exact_hash").to_numpy())
    if cfg.near and n:
        buckets = table.column("buckets").combine_chunks()
        rows.append(pc.list_parent_indices(buckets).to_numpy())
        keys.append(pc.list_flatten(buckets).to_numpy())
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    key = np.concatenate(keys).astype(np.int64) if keys else np.zeros(0, np.int64)
    taken = table.select(["order", "exact_hash"]).take(pa.array(row))
    return pa.table({"part": key % partitions, "bucket": key, "order": taken.column("order"),
                     "exact_hash": taken.column("exact_hash")}, schema=BUCKET_SCHEMA)


def signature_rows(table: pa.Table) -> pa.Table:
    """``order`` and ``signature`` of the kept documents of pass-1 records."""
    return table.filter(pc.is_null(table.column("reject_reason"))).select(["order", "signature"])


KEY_COLUMNS = ["order", "reject_reason", "exact_hash", "signature", "buckets"]


def _bucket_files(paths: list[str], fs, cfg: DedupConfig, partitions: int) -> list[tuple[pa.Table, pa.Table]]:
    """Map side of the duplicate search (a task): for each hash partition, the bucket rows of some record
    files and the signatures of the documents those rows name (once each). Only the key columns are read."""
    keys = [pq.read_table(path, columns=KEY_COLUMNS, filesystem=fs) for path in paths]
    keys = pa.concat_tables(keys).combine_chunks() if keys else None
    if keys is None:
        return [(BUCKET_SCHEMA.empty_table(), SIGNATURE_SCHEMA.empty_table())] * partitions
    rows, sigs = bucket_rows(keys, cfg, partitions), signature_rows(keys)
    part = rows.column("part").to_numpy()
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    row_orders = rows.column("order").to_numpy()
    out = []
    for p in range(partitions):
        mine = order[bounds[p]:bounds[p + 1]]
        out.append((rows.take(pa.array(mine)), _signatures_of(sigs, np.unique(row_orders[mine]))))
    return out


def _signatures_of(signatures: pa.Table, orders: np.ndarray) -> pa.Table:
    """The rows of ``signatures`` (:func:`signature_rows`) for each of ``orders``, in that order."""
    sig_orders = signatures.column("order").to_numpy()
    by_order = np.argsort(sig_orders, kind="stable")
    return signatures.take(pa.array(by_order[np.searchsorted(sig_orders, orders, sorter=by_order)]))


def _duplicates_of(cfg: DedupConfig, *parts: tuple[pa.Table, pa.Table]) -> pa.Table:
    """Reduce side (a task): every map task's rows and signatures of one partition."""
    return duplicates_in_partition(pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts]),
                                   cfg)


def dedup_partitions(docs: int, cfg: DedupConfig, cpus: int, budget: int = DEDUP_REDUCE_BYTES) -> int:
    """Hash partitions of the duplicate search: the fewest, at least one per CPU, whose reduce task holds at most
    ``budget`` bytes (doubled from ``cpus`` until it fits, at most :data:`MAX_DEDUP_PARTITIONS`).

    A document has a bucket row per band (and one for its exact hash), and its signature goes to every partition
    one of those rows hashes to: about ``P * (1 - (1 - 1/P) ** rows)`` of ``P``. Until ``P`` is well above the
    rows per document, every partition holds nearly every signature, so more partitions do not lower a reduce's
    memory; they multiply what crosses the object store (9 partitions of 98k documents: 8.3 copies of each
    signature, 420 MB, where 2 partitions of 85 MB each were enough)."""
    bands, _ = dedup.lsh_params(cfg.threshold, cfg.num_perm)
    rows = (bands if cfg.near else 0) + (1 if cfg.exact else 0)
    signature = (4 * cfg.num_perm + 12) if cfg.near else 0  # uint32 values, the order and the offset

    def held(p: int) -> float:
        return docs * (rows / p * BUCKET_SCHEMA_BYTES + (1 - (1 - 1 / p) ** rows) * signature)

    p = max(1, cpus)
    while p < MAX_DEDUP_PARTITIONS and held(p) > budget:
        p = min(2 * p, MAX_DEDUP_PARTITIONS)
    return p


def find_duplicates(tasks, files: list[str], fs, cfg: DedupConfig, partitions: int, map_tasks: int) -> pa.Table:
    """Exact and near duplicates of the pass-1 records in ``files``: a hash-partitioned map/reduce on ``tasks``
    (:mod:`executor`; on Ray the bucket rows travel through the object store, spilled to disk when large); the
    driver gets only the drop list."""
    chunks = [files[i::map_tasks] for i in range(min(map_tasks, len(files)))]
    return resolve_duplicates(tasks.map_reduce(_bucket_files, chunks, (fs, cfg), _duplicates_of, (cfg,), partitions))


def duplicates_in_partition(table: pa.Table, signatures: pa.Table, cfg: DedupConfig) -> pa.Table:
    """All buckets of one hash partition (:func:`bucket_rows`; ``signatures``: :func:`signature_rows` of at
    least the documents they name): only buckets with two or more documents are examined."""
    buckets = table.column("bucket").to_numpy()
    values, inverse, counts = np.unique(buckets, return_inverse=True, return_counts=True)
    out: dict[str, list] = {"order": [], "duplicate_of": [], "kind": []}
    shared = np.flatnonzero(counts[inverse] > 1)
    if len(shared):
        sub = table.take(pa.array(shared))
        sub_sigs = _signatures_of(signatures, sub.column("order").to_numpy()).column("signature").to_pylist()
        groups: dict[int, dict[str, list]] = {}
        for bucket, order, exact, sig in zip(*(sub.column(c).to_pylist() for c in ("bucket", "order", "exact_hash")),
                                             sub_sigs):
            group = groups.setdefault(bucket, {"order": [], "exact_hash": [], "signature": []})
            group["order"].append(order)
            group["exact_hash"].append(exact)
            group["signature"].append(sig)
        seen: dict = {}  # similarities by pair, shared by the partition's buckets
        for group in groups.values():
            found = dedup.duplicates_in_bucket(group, cfg, seen)
            for key in out:
                out[key].extend(found[key])
    return pa.Table.from_pydict(out, schema=DUP_SCHEMA)


def resolve_duplicates(tables: list[pa.Table]) -> pa.Table:
    """One row per duplicate document; an exact match wins over a near one, then the earliest original."""
    table = pa.concat_tables(tables) if tables else DUP_SCHEMA.empty_table()
    if table.num_rows == 0:
        return table
    rank = pc.if_else(pc.equal(table.column("kind"), "exact_duplicate"), 0, 1)
    table = table.append_column("rank", rank).sort_by([("order", "ascending"), ("rank", "ascending"),
                                                       ("duplicate_of", "ascending")])
    orders = table.column("order").to_numpy()
    first = np.concatenate([[True], orders[1:] != orders[:-1]])
    return table.filter(pa.array(first)).drop_columns(["rank"])


def apply_duplicates(table: pa.Table, dup_orders: np.ndarray, dup_of: np.ndarray, dup_kind: list[str]) -> pa.Table:
    """Mark rows whose ``order`` is in the sorted drop list as rejected duplicates."""
    orders = table.column("order").to_numpy()
    pos = np.searchsorted(dup_orders, orders)
    pos_clipped = np.minimum(pos, max(len(dup_orders) - 1, 0))
    hit = (pos < len(dup_orders)) & (dup_orders[pos_clipped] == orders) if len(dup_orders) else np.zeros(len(orders), bool)
    if not hit.any():
        return table
    reasons = table.column("reject_reason").to_pylist()
    details = table.column("reject_detail").to_pylist()
    for i in np.flatnonzero(hit):
        if reasons[i] is None:
            reasons[i] = dup_kind[pos[i]]
            details[i] = f"duplicate of order {int(dup_of[pos[i]])}"
    table = table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reasons, pa.string()))
    return table.set_column(table.schema.get_field_index("reject_detail"), "reject_detail", pa.array(details, pa.string()))


def clean_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("reject_reason"))).select(CLEAN_COLUMNS)


def reject_rows(table: pa.Table) -> pa.Table:
    table = table.filter(pc.invert(pc.is_null(table.column("reject_reason"))))
    text = pc.coalesce(table.column("original"), table.column("text"))
    return pa.table({"id": table.column("id"), "reason": table.column("reject_reason"),
                     "detail": table.column("reject_detail"), "text": text, "meta": table.column("meta"),
                     "source": table.column("source"), "order": table.column("order")})


SPLIT_COLUMNS = [f.name for f in STAGE_SCHEMA if f.name not in ("exact_hash", "signature", "buckets")]


def split_block(table: pa.Table, dup_orders: np.ndarray, dup_of: np.ndarray, dup_kind: list[str], clean_uri: str,
                rejects_uri: str, pack: dict | None = None) -> pa.Table:
    """Pass 3 on one block of pass-1 records (:data:`SPLIT_COLUMNS`), in one go: mark the duplicates, write the
    kept rows to ``clean/`` and the rest to ``rejects/`` (each file named after the block's first ``order``, so a
    retried block replaces its files instead of adding rows), and return the block's counters
    (:func:`partial_stats`). With ``pack`` (:func:`pack.pack_block`'s arguments, when the tokenizer is known
    before this pass) the kept rows are tokenized and packed here too, their counts and tails in the stats."""
    table = apply_duplicates(table, dup_orders, dup_of, dup_kind)
    packed = {}
    if table.num_rows:
        name = f"part-{int(pc.min(table.column('order')).as_py()):020d}.parquet"
        kept, rejected = clean_rows(table), reject_rows(table)
        if kept.num_rows:
            storage.write_parquet(storage.join(clean_uri, name), kept)
            if pack is not None:
                packed = pack_block(kept.select(["order", "text"]), **pack)
        if rejected.num_rows:
            storage.write_parquet(storage.join(rejects_uri, name), rejected)
    return partial_stats(table, packed)


def _split_files(paths: list[str], fs, dups: dict, clean_uri: str, rejects_uri: str, pack: dict | None) -> list[dict]:
    """Pass 3 as a task over some pass-1 record files (each file one block): :func:`split_block`'s rows."""
    rows = []
    for path in paths:
        table = pq.read_table(path, columns=SPLIT_COLUMNS, filesystem=fs)
        rows += split_block(table, **dups, clean_uri=clean_uri, rejects_uri=rejects_uri, pack=pack).to_pylist()
    return rows


def _pack_files(paths: list[str], fs, pack: dict) -> list[dict]:
    """Pass 5 as a task over some ``clean/`` files: :func:`pack_clean_block`'s rows."""
    rows = []
    for path in paths:
        rows += pack_clean_block(pq.read_table(path, columns=["order", "text"], filesystem=fs), pack).to_pylist()
    return rows


def _texts(files: list[str], fs, limit: int):
    """The ``text`` of the first ``limit`` rows of ``files``, streamed in record batches (the driver's memory
    holds one batch), as lists of strings (the tokenizer trainer takes them a batch at a time)."""
    left = limit
    for path in files:
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=1024, columns=["text"]):
            texts = batch.column(0).to_pylist()[:left]
            left -= len(texts)
            yield texts
            if left <= 0:
                return


def pack_clean_block(table: pa.Table, pack: dict) -> pa.Table:
    """Pass 5 on one block of ``clean/`` (when the tokenizer was trained after pass 3): a one-row table with the
    ``first_order`` and ``packed`` columns of :func:`partial_stats` (:func:`pack.pack_block`'s result)."""
    return pa.table({"first_order": [int(pc.min(table.column("order")).as_py() or 0)],
                     "packed": [_packed_json(pack_block(table, **pack))]})


def _packed_json(packed: dict) -> str:
    return json.dumps({split: list(v) for split, v in packed.items()})


def partial_stats(table: pa.Table, packed: dict | None = None) -> pa.Table:
    """Counters of one block of pass-1 records, as a one-row table (summed by the driver); ``packed``: its
    split -> (sequences, tail) when it was packed in the same pass."""
    reasons = Counter(r for r in table.column("reject_reason").to_pylist() if r is not None)
    found = pii.parse_counts(table.column("pii").to_pylist())
    docs_with_pii = sum(1 for p in table.column("pii").to_pylist() if p)
    kept = pc.is_null(table.column("reject_reason"))
    languages = Counter(table.column("lang").filter(kept).to_pylist())
    stats = {
        "records": table.num_rows,
        "chars_in": int(pc.sum(pc.utf8_length(pc.coalesce(table.column("original"), table.column("text")))).as_py() or 0),
        "utf8_repaired_records": int(pc.sum(pc.greater(table.column("utf8_repaired"), 0)).as_py() or 0),
        "utf8_repaired_sequences": int(pc.sum(table.column("utf8_repaired")).as_py() or 0),
        "reasons": dict(reasons),
        "pii": dict(found),
        "docs_with_pii": docs_with_pii,
        "languages": dict(languages),
    }
    first = int(pc.min(table.column("order")).as_py() or 0) if table.num_rows else 0
    return pa.table({"stats": [json.dumps(stats)], "first_order": [first],
                     "packed": [_packed_json(packed or {})]})


def _merge_stats(rows: list[str]) -> dict:
    total: dict = {"records": 0, "chars_in": 0, "utf8_repaired_records": 0, "utf8_repaired_sequences": 0,
                   "reasons": Counter(), "pii": Counter(), "docs_with_pii": 0, "languages": Counter()}
    for row in rows:
        part = json.loads(row)
        for key, value in part.items():
            if isinstance(value, dict):
                total[key].update(value)
            else:
                total[key] += value
    return total


def check_output(output: str, overwrite: bool) -> None:
    if storage.exists(output) and not overwrite:
        raise OutputExistsError(f"Output {output} already exists.",
                                fix="pass --overwrite to replace it, or choose another --output.")


def prepare(inputs: list[str], output: str, cfg: Config, overwrite: bool = False, dashboard: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest. Fails before any work on bad inputs or output.
    ``dashboard``: whether a local Ray this starts has its dashboard (:func:`runtime.ensure_ray`)."""

    started = time.time()
    data = cfg.data
    files = sources.expand_inputs(inputs)
    kinds = {storage.is_s3(f) for f in files}
    if len(kinds) > 1:
        raise InputError("Inputs mix local paths and s3:// URIs.", fix="stage them in one place and pass that.")
    check_output(output, overwrite)
    if data.tokenizer.path and not storage.exists(storage.join(data.tokenizer.path, "tokenizer.json")):
        raise InputError(f"data.tokenizer.path {data.tokenizer.path} holds no tokenizer.json.",
                         fix="point it at a saved HF tokenizer dir, or unset it to train one.")
    # One live prepare per output: a second one into the same dir refuses here instead of replacing the
    # first one's result at its end. Under the lease the output is checked again (it may have appeared since).
    with Lease(f"{output.rstrip('/')}.lease", what=f"prepare into {output}"):
        check_output(output, overwrite)
        tasks = start_tasks(files, cfg, dashboard)
        staging = f"{output.rstrip('/')}.partial-{uuid.uuid4().hex[:8]}"
        try:
            manifest = _run(tasks, files, staging, cfg, started)
            if storage.exists(output):
                storage.delete_tree(output)
            storage.move_tree(staging, output, last=MANIFEST)
        except BaseException:
            log.error("prepare failed; removing the partial output %s", staging)
            try:
                storage.delete_tree(staging)
            except Exception as cleanup_error:  # the original error matters more; say what was left behind
                log.warning("could not remove %s: %s", staging, cleanup_error)
            raise
        finally:
            tasks.close()
    log.info("dataset ready at %s: %s", output, json.dumps(manifest["splits"]))
    return manifest


def start_tasks(files: list[str], cfg: Config, dashboard: bool):
    """The executor of ``data.executor`` (:func:`executor.choose`), started: Ray (a local one started here
    when no cluster is given) or the pool of local processes."""
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    sizes = [info.size or 0 for info in fs.get_file_info(paths)]
    input_bytes = sum(sizes)
    if cfg.data.executor == "auto" and input_bytes <= cfg.data.local_max_mb * 1_000_000:
        # judged by what the files read as: 64 MB of gzipped JSONL is some 250 MB of text
        input_bytes = sum(sources.text_bytes(fs, path, size) for path, size in zip(paths, sizes))
    kind = executor.choose(cfg.data, cfg.ray, input_bytes)
    if kind == "local":
        tasks = executor.LocalProcesses()
        log.info("running on %d local processes (data.executor=%s, input %.1f MB; --data.executor=ray for Ray)",
                 tasks.cpus, cfg.data.executor, input_bytes / 1e6)
        return tasks
    ensure_ray(cfg.ray, dashboard=dashboard)
    return executor.RayTasks()


def _run(tasks, files: list[str], staging: str, cfg: Config, started: float) -> dict:
    data = cfg.data
    fs, _ = storage.resolve(files[0])
    out_fs, _ = storage.resolve(staging)
    paths = [storage.resolve(f)[1] for f in files]
    records_uri = storage.join(staging, "_work", "records")

    def path_of(uri: str) -> str:
        return storage.resolve(uri)[1]

    eval_ngrams = None
    if data.decontaminate:  # built once here, shared by the tasks (through the object store on Ray)
        eval_ngrams = decontam.EvalNgrams(data.decontaminate, data.decontaminate_ngram)
    log.info("step 1/5: read %d file(s), normalize, filter,%s identify languages, mask PII, MinHash", len(files),
             " decontaminate," if eval_ngrams is not None else "")
    pieces = plan_pieces(tasks, paths, fs, data)
    out_fs.create_dir(path_of(records_uri), recursive=True)
    read = tasks.map(_read_pieces, pieces, fs, data, eval_ngrams, out_fs, path_of(records_uri), what="step 1")

    log.info("step 2/5: exact and near-duplicate detection")
    n_records = sum(row["records"] for row in read)
    bands, _ = dedup.lsh_params(data.dedup.threshold, data.dedup.num_perm)
    cpus = tasks.cpus
    partitions = dedup_partitions(n_records, data.dedup, cpus)
    record_files = [path_of(f) for f in storage.list_files(records_uri) if f.endswith(".parquet")]
    if data.dedup.exact or data.dedup.near:
        map_tasks = max(2 * cpus, math.ceil(n_records / DOCS_PER_DEDUP_MAP))  # memory bounded, not the corpus
        dups = find_duplicates(tasks, record_files, out_fs, data.dedup, partitions, map_tasks=map_tasks)
    else:
        dups = DUP_SCHEMA.empty_table()
    dup_args = {"dup_orders": dups.column("order").to_numpy(), "dup_of": dups.column("duplicate_of").to_numpy(),
                "dup_kind": dups.column("kind").to_pylist()}
    log.info("found %d duplicate document(s)", dups.num_rows)

    clean_uri, rejects_uri = storage.join(staging, "clean"), storage.join(staging, "rejects")
    tokenizer_uri, tokens_uri = storage.join(staging, "tokenizer"), storage.join(staging, "tokens")
    pack_args = {"tokenizer_uri": tokenizer_uri, "seq_len": data.seq_len, "tokens_uri": tokens_uri,
                 "val_fraction": data.val_fraction, "seed": data.split_seed}
    given = data.tokenizer.path is not None
    if given:  # known before pass 3: the kept rows are tokenized and packed in the same pass (steps 3 to 5 in one)
        storage.upload_dir(tokenizer_lib.local_copy(data.tokenizer.path), tokenizer_uri)
        tokenizer_lib.load_fast(tokenizer_uri)  # a clear error here, not in every task
    log.info("step 3/5: write clean/ and rejects/%s", ", tokenize and pack (tokenizer given)" if given else "")
    stat_rows = tasks.map(_split_files, record_files, out_fs, dup_args, clean_uri, rejects_uri,
                            pack_args if given else None, what="step 3")
    totals = _merge_stats([r["stats"] for r in stat_rows])
    for uri in (clean_uri, rejects_uri):  # there even when no row went to one of them
        storage.make_dir(uri)
    kept_docs = totals["records"] - sum(totals["reasons"].values())
    if kept_docs == 0:
        raise InputError(
            f"No document passed the pipeline: {dict(totals['reasons'])} of {totals['records']} records rejected.",
            fix="inspect rejects/ reasons and loosen data.* thresholds (for example --data.min_chars).")

    if given:
        pack_rows = stat_rows
        log.info("step 4/5: tokenizer %s (given); step 5/5 done in step 3", data.tokenizer.path)
    else:
        log.info("step 4/5: train the tokenizer")
        clean_files = [path_of(f) for f in storage.list_files(clean_uri) if f.endswith(".parquet")]
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_lib.train_tokenizer(_texts(clean_files, out_fs, data.tokenizer.max_train_docs), data.tokenizer,
                                          tmp, model_max_length=data.seq_len)
            storage.upload_dir(tmp, tokenizer_uri)
        log.info("step 5/5: tokenize and pack into %d-token sequences", data.seq_len)
        pack_rows = tasks.map(_pack_files, clean_files, out_fs, pack_args, what="step 5")
    packed = [(r["first_order"], json.loads(r["packed"])) for r in pack_rows]
    tok = tokenizer_lib.load_fast(tokenizer_uri)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    packed.sort(key=lambda item: item[0])  # the tails joined in input order: the same dataset on every run
    sequences = Counter()
    tails: dict[str, list[list[int]]] = {"train": [], "val": []}
    for _, by_split in packed:
        for split, (n, tail) in by_split.items():
            sequences[split] += n
            tails[split].append(tail)
    sequences.update(pack_tails(tails, data.seq_len, tokens_uri))
    splits = {}
    for split in ("train", "val") if data.val_fraction > 0 else ("train",):
        storage.make_dir(storage.join(tokens_uri, split))  # there even when no sequence filled up
        splits[split] = {"path": f"tokens/{split}", "sequences": sequences[split],
                         "tokens": sequences[split] * data.seq_len}
        if sequences[split] == 0:
            log.warning("split %r has no full %d-token sequence: lower data.seq_len or add data", split, data.seq_len)
    storage.delete_tree(storage.join(staging, "_work"))

    elapsed = time.time() - started
    reasons = dict(totals["reasons"])
    stats = {
        "input": {"files": len(files), "records": totals["records"], "chars": totals["chars_in"]},
        "read": {"malformed_json": reasons.get("malformed_json", 0), "missing_text": reasons.get("missing_text", 0),
                 "utf8_repaired_records": totals["utf8_repaired_records"],
                 "utf8_repaired_sequences": totals["utf8_repaired_sequences"]},
        "filter": {k: v for k, v in reasons.items() if k not in ("malformed_json", "missing_text", "exact_duplicate",
                                                                 "near_duplicate", "language", "contaminated")},
        "languages": {"kept": dict(totals["languages"].most_common()), "rejected": reasons.get("language", 0),
                      "wanted": list(data.languages)},
        "decontamination": {"contaminated": reasons.get("contaminated", 0), "files": list(data.decontaminate),
                            "ngram": data.decontaminate_ngram},
        "pii": {"by_type": dict(totals["pii"]), "docs_with_pii": totals["docs_with_pii"]},
        "dedup": {"exact_duplicates": reasons.get("exact_duplicate", 0),
                  "near_duplicates": reasons.get("near_duplicate", 0),
                  "lsh_bands": bands, "threshold": data.dedup.threshold},
        "kept_docs": kept_docs,
        "rejected_docs": sum(reasons.values()),
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "executor": {"kind": tasks.name, "cpus": cpus},
        "seconds": round(elapsed, 2),
        "docs_per_s": round(totals["records"] / elapsed, 1) if elapsed > 0 else None,
    }
    manifest = {
        "format": DATASET_FORMAT,
        "tokenizer": "tokenizer",
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer_lib.token_id(tok, tokenizer_lib.EOS, tokenizer_uri),
        "pad_token_id": tokenizer_lib.token_id(tok, tokenizer_lib.PAD, tokenizer_uri),
        "seq_len": data.seq_len,
        "splits": splits,
        "clean": "clean",
        "rejects": "rejects",
        "inputs": files,
        "created_unix": int(time.time()),
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_json(storage.join(staging, "stats.json"), stats)
    storage.write_text(storage.join(staging, "config.yaml"), dump_config(cfg))
    storage.write_json(storage.join(staging, MANIFEST), manifest)
    return manifest


def load_manifest(dataset: str) -> dict:
    """The manifest of a prepared dataset, or a clear error when ``dataset`` is not one."""
    uri = storage.join(dataset, MANIFEST)
    if not storage.exists(uri):
        raise InputError(f"{dataset} is not a prepared dataset (no {MANIFEST}).",
                         fix=f"run `llmforge prepare --input CORPUS --output {dataset}` first.")
    manifest = storage.read_json(uri)
    if manifest.get("format") != DATASET_FORMAT:
        raise InputError(f"{uri} has format {manifest.get('format')!r}, expected {DATASET_FORMAT!r}.",
                         fix="prepare the dataset again with this version of llmforge.")
    return manifest
