"""Leases in storage: one live job at a time per output, found wherever the output lives (local or ``s3://``).

A lease is a small JSON file beside what it guards (``runs/my-data.lease``, ``s3://b/ckpts/RUN.lease``): who
holds it (a random owner id, host, pid, what for) and until when. The holder renews it every sixth of its
time to live. A job that finds a lease tells a live holder from a dead one before it decides:

- the holder's pid is gone from this very host: the lease is stale, taken over at once (a resubmitted job);
- otherwise the job watches the lease: a renewal proves the holder alive, and the job refuses, naming it;
  a lease that expires without one is taken over (the holder died elsewhere: a lost node or pod).

Of two jobs starting together, one takes the lease and the other refuses. On a local (or shared) filesystem
the look-and-write happens under an ``flock`` of the lease's directory and the lease file is replaced whole,
so a reader never sees half of it. S3 has no lock or compare-and-swap here: a job writes its lease, waits
``settle_s`` and reads it back, and the one whose write did not stick refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from llmforge import storage
from llmforge.errors import LeaseHeld, StorageError

log = logging.getLogger("llmforge")
DEFAULT_TTL_S = 60.0


class Lease:
    def __init__(self, uri: str, what: str, ttl_s: float = DEFAULT_TTL_S, settle_s: float = 0.5):
        self.uri, self.what, self.ttl_s, self.settle_s = uri, what, ttl_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                "expires_at": time.time() + self.ttl_s}

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.uri))
        except (StorageError, ValueError):  # absent, or half-written by a holder that died: no live holder
            return None

    def _refuse(self, held: dict) -> None:
        left = held.get("expires_at", 0) - time.time()
        raise LeaseHeld(
            f"Another job holds {self.uri}: {held.get('what', '?')} (host {held.get('host', '?')}, pid "
            f"{held.get('pid', '?')}); its lease is renewed while it runs and expires {left:.0f}s from now if it stops.",
            fix="wait for that job to finish, or use another output / train.run_name; a job that died frees it "
                f"within {self.ttl_s:.0f}s.")

    def acquire(self) -> "Lease":
        held = self._read()
        if held is not None and self._is_live(held):
            self._wait_out(held)
        with self._locked() as locked:
            now = self._read()  # what is there now, looked at under the lock
            if now is not None and self._is_live(now):
                self._refuse(now)  # another job took it, or its holder renewed it, since we looked
            if now is not None:
                log.warning("taking over the lease %s of %s (host %s, pid %s), whose holder has stopped", self.uri,
                            now.get("what"), now.get("host"), now.get("pid"))
            self._write()
        if not locked:  # S3 (or a filesystem without flock): settle between writers that overlapped
            time.sleep(self.settle_s)
            now = self._read()
            if now is None or now.get("owner") != self.owner:
                self._refuse(now or {})
        self._renewer = threading.Thread(target=self._renew, name="llmforge-lease", daemon=True)
        self._renewer.start()
        return self

    def _is_live(self, held: dict) -> bool:
        return held.get("expires_at", 0) > time.time() and not self._holder_is_gone(held)

    @contextlib.contextmanager
    def _locked(self):
        """Hold an exclusive ``flock`` on a local lease's directory (processes and threads alike: each call opens
        its own descriptor); yields whether it is held. S3, or a filesystem refusing ``flock``: yields False."""
        if storage.is_s3(self.uri):
            yield False
            return
        directory = Path(storage.resolve(self.uri)[1]).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:
                locked = False
            yield locked
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @staticmethod
    def _holder_is_gone(held: dict) -> bool:
        """The holder ran on this host and its process no longer exists."""
        if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _wait_out(self, held: dict) -> None:
        """Watch a live lease held elsewhere: refuse on its first renewal; return once it expired unrenewed or
        was released."""
        log.info("%s is held by %s (host %s, pid %s); checking whether it is still renewed (up to %.0fs)",
                 self.uri, held.get("what"), held.get("host"), held.get("pid"), held["expires_at"] - time.time())
        while time.time() < held["expires_at"]:
            time.sleep(min(1.0, self.ttl_s / 12))
            now = self._read()
            if now is None:
                return
            if now.get("owner") != held.get("owner") or now.get("expires_at", 0) > held["expires_at"]:
                self._refuse(now)

    def _write(self) -> None:
        data = json.dumps(self._record()).encode()
        if storage.is_s3(self.uri):  # a PUT replaces the object whole
            storage.write_bytes(self.uri, data)
            return
        path = Path(storage.resolve(self.uri)[1])
        staged = path.with_name(f".{path.name}.{self.owner}")
        try:
            staged.write_bytes(data)
            os.replace(staged, path)  # readers see the old lease or the new one, never part of one
        except OSError:
            staged.unlink(missing_ok=True)  # a full disk or a lost mount: no staged file left beside the lease
            raise

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                with self._locked():
                    held = self._read()
                    if held is not None and held.get("owner") != self.owner:
                        log.error("lost the lease %s to %s (host %s): another job took it over", self.uri,
                                  held.get("what"), held.get("host"))
                        return
                    self._write()
            except OSError as exc:  # storage briefly unreachable (S3 retries spent): the next renewal tries again
                log.warning("could not renew the lease %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._locked():
            held = self._read()
            if held is not None and held.get("owner") == self.owner:
                storage.delete_tree(self.uri)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
