"""Reading a corpus: JSONL (optionally gzipped), plain text and Parquet, local or ``s3://``.

Every input record becomes one row of :data:`RECORD_SCHEMA`. A record that cannot be used (a line
that is not JSON, no text field) is not dropped: it gets a ``reject_reason`` and travels on to
``rejects/``. ``order`` (file index << 32 | record number) identifies a record across the whole
run and fixes which of several duplicates is kept.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llmforge import storage
from llmforge.config import DataConfig
from llmforge.errors import InputError

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".txt": "txt", ".txt.gz": "txt",
           ".parquet": "parquet"}
SUFFIXES = tuple(FORMATS)

RECORD_SCHEMA = pa.schema([
    ("order", pa.int64()),
    ("id", pa.string()),
    ("source", pa.string()),
    ("text", pa.string()),
    ("original", pa.string()),
    ("meta", pa.string()),
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
    ("utf8_repaired", pa.int32()),
])
_READ_CHUNK = 1 << 20
KEPT_PREFIX_BYTES = 64 << 10  # what rejects/ keeps of a record too long to read whole


def input_format(path: str) -> str | None:
    lower = path.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    return None


def expand_inputs(specs: list[str]) -> list[str]:
    """Resolve files, directories and globs to a sorted list of input URIs, or fail before any work."""
    if not specs:
        raise InputError("No input given.", fix="pass --input PATH_OR_GLOB (repeatable).")
    files: list[str] = []
    for spec in specs:
        found = storage.expand(spec, SUFFIXES)
        if not found:
            if storage.exists(spec):
                raise InputError(f"Input {spec} holds no corpus files.",
                                 fix=f"inputs are files ending in {', '.join(SUFFIXES)}.")
            raise InputError(f"Input {spec} does not exist.", fix="check the path (and AWS_ENDPOINT_URL for s3://).")
        unsupported = [f for f in found if input_format(f) is None]
        if unsupported:
            raise InputError(f"Unsupported input file {unsupported[0]}.",
                             fix=f"inputs are files ending in {', '.join(SUFFIXES)}.")
        files.extend(found)
    files = sorted(set(files))
    sizes = {f: storage.info(f).size or 0 for f in files}
    if not any(sizes.values()):
        raise InputError(f"All inputs are empty: {', '.join(files[:5])}.", fix="point --input at a corpus with text.")
    return files


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid byte sequences that were replaced with U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))


def _row(order: int, rid: str, source: str, text: str, *, meta: str = "", reason: str | None = None,
         detail: str | None = None, repaired: int = 0) -> dict:
    return {"order": order, "id": rid, "source": source, "text": text, "original": None, "meta": meta,
            "reject_reason": reason, "reject_detail": detail, "utf8_repaired": repaired}


def record_from_mapping(obj: object, order: int, default_id: str, source: str, cfg: DataConfig,
                        repaired: int = 0, raw: str = "") -> dict:
    """One parsed JSON object or Parquet row -> a record row (rejected when it has no usable text)."""
    if not isinstance(obj, dict):
        return _row(order, default_id, source, raw, reason="malformed_json",
                    detail=f"expected a JSON object, got {type(obj).__name__}", repaired=repaired)
    text = obj.get(cfg.text_field)
    rid = obj.get(cfg.id_field)
    rid = default_id if rid is None else str(rid)
    meta_fields = {k: v for k, v in obj.items() if k not in (cfg.text_field, cfg.id_field)}
    meta = json.dumps(meta_fields, ensure_ascii=False, default=str) if meta_fields else ""
    if not isinstance(text, str):
        what = "missing" if text is None else f"not a string ({type(text).__name__})"
        return _row(order, rid, source, raw or json.dumps(obj, ensure_ascii=False, default=str), meta=meta,
                    reason="missing_text", detail=f"field {cfg.text_field!r} is {what}", repaired=repaired)
    return _row(order, rid, source, text, meta=meta, repaired=repaired)


def parse_json(line: str) -> tuple[object, str | None]:
    """The parsed value, or None and why not. Besides bad syntax, json.loads raises RecursionError for deeply
    nested input (``"[" * 100000``) and ValueError for integers of thousands of digits: all are bad lines."""
    try:
        return json.loads(line), None
    except RecursionError:
        return None, "nested too deeply to parse"
    except ValueError as exc:  # JSONDecodeError included
        return None, str(exc)


def record_from_json_line(line: str, order: int, default_id: str, source: str, cfg: DataConfig,
                          repaired: int = 0) -> dict:
    obj, problem = parse_json(line)
    if problem is not None:
        return _row(order, default_id, source, line, reason="malformed_json", detail=problem, repaired=repaired)
    return record_from_mapping(obj, order, default_id, source, cfg, repaired, raw=line)


def max_line_bytes(cfg: DataConfig) -> int:
    """The longest line any record within ``max_chars`` can take: a character is at most 12 bytes as JSON (a
    surrogate pair of \\u escapes), plus 1 MiB for the id and other fields."""
    return 12 * cfg.max_chars + (1 << 20)


def iter_lines(stream, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """``(line, dropped)`` for each line of a byte stream, in memory bounded by ``max_bytes``: a longer line
    comes back as its first ``KEPT_PREFIX_BYTES`` with ``dropped`` > 0, the number of its bytes not kept."""
    kept, dropped = b"", 0  # the current line: all of it while within max_bytes, else its start and a count
    while chunk := stream.read(_READ_CHUNK):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if dropped:
                dropped += len(piece)
            else:
                kept += piece
                if len(kept) > max_bytes:
                    dropped, kept = len(kept) - KEPT_PREFIX_BYTES, kept[:KEPT_PREFIX_BYTES]
            if end < 0:
                break
            yield kept, dropped
            kept, dropped, start = b"", 0, end + 1
    if kept or dropped:
        yield kept, dropped


def _too_long(order: int, rid: str, source: str, kept: bytes, size: int, limit: int, cfg: DataConfig) -> dict:
    text, repaired = decode(kept)
    return _row(order, rid, source, text, reason="too_long", repaired=repaired,
                detail=f"{size} bytes, more than the {limit} any record within data.max_chars={cfg.max_chars} can "
                       f"take; read in bounded memory, its first {len(kept)} bytes kept here")


def iter_records(stream, path: str, file_index: int, cfg: DataConfig, first_line: int = 0) -> Iterator[dict]:
    """Records of one JSONL or text file, streamed in memory bounded by :func:`max_line_bytes`: a line, file or
    paragraph longer than that is a ``too_long`` reject holding its start. A JSONL or ``line`` record's ``order``
    is its file's index and its line's (a blank line is skipped, its number is not reused), so a byte range of
    the file read on its own (:class:`RangeStream`, ``first_line`` its first line's index) gives the same
    records as the whole file."""
    fmt = input_format(path)
    name = posixpath.basename(path)
    base_order = file_index << 32
    limit = max_line_bytes(cfg)
    if fmt == "jsonl":
        for lineno, (raw, dropped) in enumerate(iter_lines(stream, limit), start=first_line + 1):
            order = base_order | (lineno - 1)
            if dropped:
                yield _too_long(order, f"{name}:{lineno}", path, raw, len(raw) + dropped, limit, cfg)
            elif raw.strip():
                line, repaired = decode(raw.rstrip(b"\r"))
                yield record_from_json_line(line, order, f"{name}:{lineno}", path, cfg, repaired)
        return
    if cfg.txt_mode == "file":
        data = stream.read(limit + 1)
        if len(data) > limit:
            size = len(data) + sum(len(chunk) for chunk in iter(lambda: stream.read(_READ_CHUNK), b""))
            yield _too_long(base_order, name, path, data[:KEPT_PREFIX_BYTES], size, limit, cfg)
            return
        text, repaired = decode(data)
        if text.strip():
            yield _row(base_order, name, path, text, repaired=repaired)
        return
    if cfg.txt_mode == "line":
        for lineno, (raw, dropped) in enumerate(iter_lines(stream, limit), start=first_line + 1):
            order = base_order | (lineno - 1)
            if dropped:
                yield _too_long(order, f"{name}:{lineno}", path, raw, len(raw) + dropped, limit, cfg)
                continue
            line, repaired = decode(raw.rstrip(b"\r"))
            if line.strip():
                yield _row(order, f"{name}:{lineno}", path, line, repaired=repaired)
        return
    n = 0
    # Paragraphs: runs of non-blank lines, bounded like a line (their bytes are counted, not kept, past it).
    buffer: list[bytes] = []
    size = start = 0
    for lineno, (raw, dropped) in enumerate(iter_lines(stream, limit), start=1):
        if raw.strip() or dropped:
            start = start if size else lineno
            if size + len(raw) <= limit:
                buffer.append(raw.rstrip(b"\r"))
            size += len(raw) + dropped + 1
        elif size:
            yield _paragraph(base_order | n, f"{name}:{start}", path, buffer, size, limit, cfg)
            n += 1
            buffer, size = [], 0
    if size:
        yield _paragraph(base_order | n, f"{name}:{start}", path, buffer, size, limit, cfg)


def _paragraph(order: int, rid: str, source: str, lines: list[bytes], size: int, limit: int, cfg: DataConfig) -> dict:
    raw = b"\n".join(lines)
    if size - 1 > limit:
        return _too_long(order, rid, source, raw[:KEPT_PREFIX_BYTES], size - 1, limit, cfg)
    text, repaired = decode(raw)
    return _row(order, rid, source, text, repaired=repaired)


def iter_parquet_records(f, path: str, file_index: int, cfg: DataConfig) -> Iterator[dict]:
    name = posixpath.basename(path)
    n = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield record_from_mapping(obj, (file_index << 32) | n, f"{name}:{n + 1}", path, cfg)
            n += 1


def _blocks(rows: Iterator[dict], size: int) -> Iterator[pa.Table]:
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            yield pa.Table.from_pylist(buffer, schema=RECORD_SCHEMA)
            buffer = []
    if buffer:
        yield pa.Table.from_pylist(buffer, schema=RECORD_SCHEMA)


def text_bytes(fs, path: str, size: int) -> int:
    """About how many bytes ``path`` reads as: for a gzip file its own record of its uncompressed size (the
    last four bytes of the file, modulo 4 GiB, of its last member only; never taken as less than the file),
    otherwise its size. One small read per gzip file."""
    if not path.lower().endswith(".gz") or size < 18:  # a gzip member's header and trailer alone are 18 bytes
        return size
    try:
        with fs.open_input_file(path) as f:
            f.seek(size - 4)
            return max(size, int.from_bytes(f.read(4), "little"))
    except OSError:  # unreadable now: left to step 1, whose read of it fails the same way
        return size


def splittable(path: str, cfg: DataConfig) -> bool:
    """Whether a file can be read in byte ranges: uncompressed JSONL, or text with one record per line."""
    lower = path.lower()
    return lower.endswith(".jsonl") or (lower.endswith(".txt") and cfg.txt_mode == "line")


@dataclass(frozen=True)
class Piece:
    """What one read task reads: a whole file, or the lines of a splittable file that start in bytes
    ``[start, end)`` (``newlines_before``: the newlines in the bytes before ``start``, which number its lines)."""
    path: str
    index: int
    start: int = 0
    end: int | None = None
    newlines_before: int = 0
    part: int = 0  # the range's position in its file


def byte_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    """``size`` bytes cut into equal ranges of at most ``range_bytes``."""
    n = max(1, -(-size // range_bytes))
    bounds = [size * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def count_newlines(f, start: int, end: int) -> int:
    """Newlines in bytes ``[start, end)`` of a random-access file, read in bounded chunks."""
    f.seek(start)
    count, left = 0, end - start
    while left > 0 and (chunk := f.read(min(_READ_CHUNK, left))):
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


class RangeStream:
    """The bytes of the lines of a random-access file that start in ``[start, end)``, as a stream (``read``):
    from the first line start at or after ``start`` through the newline that ends the line holding byte
    ``end - 1``. ``skipped_newline``: whether a newline at or after ``start`` was passed to find the first line
    (then its index is one more than the newlines before ``start``)."""

    def __init__(self, f, start: int, end: int):
        self._f, self._end, self._done = f, end, False
        self._pos = start
        self.skipped_newline = False
        self._pending = b""
        if start > 0:  # the line holding byte start-1 began in an earlier range: skip to its end
            f.seek(start - 1)
            self._pos = start - 1
            while True:
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    self._done = True
                    break
                hit = chunk.find(b"\n")
                if hit >= 0:
                    self.skipped_newline = self._pos + hit >= start
                    self._pending = chunk[hit + 1:]
                    self._pos += hit + 1
                    break
                self._pos += len(chunk)
            if self._pos >= end:  # no line starts in this range
                self._done = True

    def read(self, n: int = _READ_CHUNK) -> bytes:
        if self._done:
            return b""
        data, self._pending = (self._pending, b"") if self._pending else (self._f.read(n), b"")
        if not data:
            self._done = True
            return b""
        if self._pos + len(data) < self._end:
            self._pos += len(data)
            return data
        # the range ends in this chunk: keep through the newline that ends the line holding byte end-1
        cut = data.find(b"\n", max(0, self._end - 1 - self._pos))
        if cut >= 0:
            self._done = True
            return data[:cut + 1]
        self._pos += len(data)
        return data


def read_blocks(fs, piece: Piece, cfg: DataConfig) -> Iterator[pa.Table]:
    """The records of one piece, in tables of ``cfg.batch_size`` rows, streamed."""
    if input_format(piece.path) == "parquet":  # Parquet needs random access, not a stream
        with fs.open_input_file(piece.path) as f:
            yield from _blocks(iter_parquet_records(f, piece.path, piece.index, cfg), cfg.batch_size)
    elif piece.end is None:
        with fs.open_input_stream(piece.path) as f:  # compression detected from the name (.gz)
            yield from _blocks(iter_records(f, piece.path, piece.index, cfg), cfg.batch_size)
    else:
        with fs.open_input_file(piece.path) as f:
            stream = RangeStream(f, piece.start, piece.end)
            first_line = piece.newlines_before + stream.skipped_newline
            yield from _blocks(iter_records(stream, piece.path, piece.index, cfg, first_line), cfg.batch_size)
