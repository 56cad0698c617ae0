"""Leases in storage: one live job at a time per output, found wherever the output lives (local or ``s3://``).

A lease is a small JSON file beside what it guards (``runs/my-data.lease``, ``s3://b/ckpts/RUN.lease``): who
holds it (a random owner id, host, pid, what for) and until when. The holder renews it every sixth of its
time to live. A job that finds a lease tells a live holder from a dead one before it decides:

- the holder's pid is gone from this very host: the lease is stale, taken over at once (a resubmitted job);
- otherwise the job watches the lease: a renewal proves the holder alive, and the job refuses, naming it;
  a lease that expires without one is taken over (the holder died elsewhere: a lost node or pod).

Taking a lease writes it and reads it back after a short pause, so of two jobs starting together the one
whose write did not stick refuses (local files are created exclusively; S3 has no compare-and-swap here,
and the pause covers writers that overlap in time).
"""

from __future__ import annotations

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
        if held is not None and held.get("expires_at", 0) > time.time() and not self._holder_is_gone(held):
            held = self._wait_out(held)
        if held is not None:
            log.warning("taking over the lease %s of %s (host %s, pid %s), whose holder has stopped", self.uri,
                        held.get("what"), held.get("host"), held.get("pid"))
        # Created exclusively where no file is (two fresh starters: one create wins); an expired or half-written
        # lease is overwritten, and the read-back below settles between overwriters.
        self._write(exclusive=not storage.exists(self.uri))
        time.sleep(self.settle_s)
        now_held = self._read()
        if now_held is None or now_held.get("owner") != self.owner:
            self._refuse(now_held or {})
        self._renewer = threading.Thread(target=self._renew, name="llmforge-lease", daemon=True)
        self._renewer.start()
        return self

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

    def _wait_out(self, held: dict) -> dict | None:
        """Watch a live lease held elsewhere: refuse on its first renewal, return it once it expired unrenewed
        (None if it was released meanwhile)."""
        log.info("%s is held by %s (host %s, pid %s); checking whether it is still renewed (up to %.0fs)",
                 self.uri, held.get("what"), held.get("host"), held.get("pid"), held["expires_at"] - time.time())
        while time.time() < held["expires_at"]:
            time.sleep(min(1.0, self.ttl_s / 12))
            now = self._read()
            if now is None:
                return None
            if now.get("owner") != held.get("owner") or now.get("expires_at", 0) > held["expires_at"]:
                self._refuse(now)
        return held

    def _write(self, exclusive: bool) -> None:
        data = json.dumps(self._record()).encode()
        if exclusive and not storage.is_s3(self.uri):
            path = Path(storage.resolve(self.uri)[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse(self._read() or {})
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        storage.write_bytes(self.uri, data)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                held = self._read()
                if held is not None and held.get("owner") != self.owner:
                    log.error("lost the lease %s to %s (host %s): another job took it over", self.uri,
                              held.get("what"), held.get("host"))
                    return
                storage.write_bytes(self.uri, json.dumps(self._record()).encode())
            except OSError as exc:  # storage briefly unreachable (S3 retries spent): the next renewal tries again
                log.warning("could not renew the lease %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            storage.delete_tree(self.uri)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
