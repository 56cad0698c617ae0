"""Local paths and ``s3://bucket/prefix`` URIs behind one small API.

This module is the one place that knows the difference. Ray Data and Ray Train take the pyarrow
filesystem and path that :func:`resolve` returns. A non-AWS endpoint (MinIO, moto) is selected with
``AWS_ENDPOINT_URL``; credentials come from the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from llmforge.errors import StorageError

S3_SCHEME = "s3://"
# Attempts per S3 request (the AWS SDK's standard retry mode: exponential back-off with jitter, capped at
# 20 s). 8 rides out about 35 s of an unreachable endpoint before an error; LLMFORGE_S3_MAX_ATTEMPTS overrides.
S3_MAX_ATTEMPTS = 8


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def _s3_settings() -> dict[str, Any]:
    """Endpoint, region and retries from the environment (credentials stay with pyarrow's own lookup)."""
    settings: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                                "max_attempts": int(os.environ.get("LLMFORGE_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        settings.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return settings


def _s3_from(settings: dict[str, Any]) -> pafs.S3FileSystem:
    kwargs = {k: v for k, v in settings.items() if k != "max_attempts"}
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings["max_attempts"]), **kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem for the endpoint in ``AWS_ENDPOINT_URL`` (AWS itself when unset) that retries
    failed requests (network errors, throttling, 5xx) with back-off."""
    return _s3_from(_s3_settings())


class _RetryingS3(pafs.FileSystemHandler):
    """:func:`s3_filesystem` behind pyarrow's Python filesystem API, so that it survives pickling whole:
    pyarrow drops an ``S3FileSystem``'s retry strategy when it is pickled, and Ray Train pickles the storage
    filesystem to every worker, which uploads checkpoints with it. It travels as its settings (endpoint,
    region, retries; never credentials) and is rebuilt from them."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.fs = _s3_from(settings)

    def __reduce__(self):
        return _RetryingS3, (self.settings,)

    def get_type_name(self):
        return "llmforge-s3"

    def equals(self, other):
        return isinstance(other, _RetryingS3) and other.settings == self.settings

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def picklable_s3_filesystem() -> pafs.FileSystem:
    """:func:`s3_filesystem`, retries included even after pickling (for Ray Train's ``storage_filesystem``)."""
    return pafs.PyFileSystem(_RetryingS3(_s3_settings()))


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://`` URI, as pyarrow and Ray expect them."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len(S3_SCHEME):].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"{uri!r} is not a valid S3 URI.", fix="write s3://bucket/prefix.")
        return s3_filesystem(), path
    if "://" in uri:
        raise StorageError(f"Unsupported URI scheme in {uri!r}.", fix="use a local path or s3://bucket/prefix.")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def absolute(uri: str | Path) -> str:
    """``uri`` with a local path made absolute (Ray workers run in other directories); ``s3://`` as is."""
    return to_uri(*resolve(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`resolve`."""
    return f"{S3_SCHEME}{path}" if fs.type_name in ("s3", "py::llmforge-s3") else path


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"Cannot reach {uri}: {exc}", fix="check the path, the credentials and AWS_ENDPOINT_URL.") from None


def exists(uri: str) -> bool:
    found = info(uri)
    if found.type == pafs.FileType.Directory and is_s3(uri):
        return bool(list_files(uri))  # S3 "directories" exist only while they hold objects
    return found.type != pafs.FileType.NotFound


def _files_below(uri: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"Cannot list {uri}: {exc}", fix="check the path, the credentials and AWS_ENDPOINT_URL.") from None
    return fs, path, [i for i in infos if i.type == pafs.FileType.File]


def list_files(uri: str) -> list[str]:
    """Every file below ``uri`` (recursive), as URIs, sorted."""
    fs, _, files = _files_below(uri)
    return sorted(to_uri(fs, i.path) for i in files)


def file_sizes(uri: str) -> dict[str, int]:
    """``{relative posix path: size in bytes}`` of every file below ``uri`` (recursive)."""
    _, path, files = _files_below(uri)
    return {posixpath.relpath(i.path, path): i.size for i in files}


def expand(spec: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (its files with one of ``suffixes``, recursively) or a glob, as sorted URIs."""
    if any(ch in spec for ch in "*?["):
        base = spec
        while any(ch in base for ch in "*?["):
            base = posixpath.dirname(base)
        base = base or "."
        rest = spec[len(base):].lstrip("/")
        fs, base_path = resolve(base)
        pattern = posixpath.join(to_uri(fs, base_path), rest)
        return [f for f in list_files(base) if fnmatch.fnmatch(f, pattern)]
    if info(spec).type == pafs.FileType.File:
        return [to_uri(*resolve(spec))]
    return [f for f in list_files(spec) if f.lower().endswith(suffixes)]


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist.") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def _output_stream(uri: str):
    fs, path = resolve(uri)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fs.open_output_stream(path)


def write_bytes(uri: str, data: bytes) -> None:
    with _output_stream(uri) as f:
        f.write(data)


def write_parquet(uri: str, table) -> None:
    """One Parquet file at ``uri`` (a local parent directory is made first)."""
    import pyarrow.parquet as pq
    with _output_stream(uri) as f:
        pq.write_table(table, f)


def make_dir(uri: str) -> None:
    """``uri`` as a directory, there even with nothing in it (on S3, pyarrow's empty-directory marker)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def move_tree(src: str, dst: str, last: str | None = None) -> None:
    """Move everything under ``src`` to ``dst``. ``last`` (a relative name) is moved after all others,
    so on S3, where there is no atomic rename, its presence marks a complete copy."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    if not is_s3(src):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src_path, dst_path)
        return
    files = list_files(src)
    files.sort(key=lambda f: posixpath.relpath(f, src) == last)
    for f in files:
        rel = posixpath.relpath(f, src)
        fs.move(resolve(f)[1], posixpath.join(dst_path, rel))
    delete_tree(src)


@contextlib.contextmanager
def publishing(uri: str, last: str) -> Iterator[Path]:
    """A local dir to write a complete output into; when the block ends without error it replaces ``uri`` whole,
    so no reader ever sees half an output. Locally the dir is staged beside ``uri`` and swapped in by renames;
    on S3 it is uploaded beside ``uri`` and moved into place with ``last`` (the file readers check first, such
    as ``config.json``) moved after all others. A failed block leaves ``uri`` as it was."""
    tag = uuid.uuid4().hex[:8]
    if not is_s3(uri):
        target = Path(resolve(uri)[1])
        staged = target.parent / f".{target.name}.partial-{tag}"
        staged.mkdir(parents=True)
        try:
            yield staged
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        old = target.parent / f".{target.name}.old-{tag}"
        if target.exists():
            os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        staged_uri = f"{uri.rstrip('/')}.partial-{tag}"
        upload_dir(tmp, staged_uri)
        if exists(uri):
            delete_tree(uri)
        move_tree(staged_uri, uri, last=last)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or S3)."""
    fs, path = resolve(uri)
    if not is_s3(uri):
        Path(path).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy the tree under ``uri`` into ``local_dir``; returns the local path."""
    fs, path = resolve(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
