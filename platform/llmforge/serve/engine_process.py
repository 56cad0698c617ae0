"""The engine in a process of its own beside the replica's HTTP side; no Ray in here.

A Python process runs one thread at a time. With the engine inside the replica, its generation thread (a decode
step of a small model is mostly Python dispatching tensor ops) and the replica's request handling (Ray Serve's
messaging, the ASGI app, JSON) took turns on that one interpreter and each step waited for the other side. In a
child process the engine has an interpreter to itself; the two sides meet once per step over a pipe.

:class:`EngineProcess` has the :class:`~llmforge.serve.engine.Engine` interface the HTTP API uses (``submit``
with a sink, ``cancel`` on the handle, ``settings``, ``alive``, ``stats``, ``shutdown``). Requests and
cancellations go to the child as they come; the child sends back, after every step, that step's events (the
text of every running sequence), the metrics calls and the engine's counters in one message. The queue limit is
kept on this side, so an overloaded server refuses a request at once (503) instead of after a round trip.

The child exits when its pipe closes, so a replica that dies, even by SIGKILL, takes its engine with it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from llmforge.serve.engine import EngineSettings, EngineStopped, Event, Metrics, QueueFull, SamplingParams, check_request

log = logging.getLogger("llmforge.serve")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the dir holding llmforge/


class EngineStartError(RuntimeError):
    """The engine process could not load the model or start."""


class _Handle:
    def __init__(self, client: "EngineProcess", rid: int):
        self._client, self._rid = client, rid
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._client._send(("cancel", self._rid))


class _Request:
    __slots__ = ("sink", "n", "done")

    def __init__(self, sink: Callable[[Event], None], n: int):
        self.sink, self.n, self.done = sink, n, set()  # done: the choices that have ended


class EngineProcess:
    """An :class:`Engine` for the model in ``model_dir``, running in a child process."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings, adapters: dict[str, str] | None = None,
                 dtype: str = "auto", quantize: str = "none", threads: int | None = None,
                 metrics: Metrics | None = None, start_timeout_s: float = 900.0):
        self.settings = settings
        self.adapter_paths = dict(adapters or {})
        self.metrics = metrics or Metrics()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._proc = subprocess.Popen([sys.executable, "-m", "llmforge.serve.engine_process", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._sent = 0          # sequences sent to the child (a request's n choices each)
        self._stats = {"running": 0, "waiting": 0, "tokens_generated": 0, "requests_finished": 0,
                       "adapters_loaded": []}
        self._child_received = 0  # sequences the child had taken when it sent those stats
        self._accepting = True
        self._dead = False
        # The child is not told about the queue limit: this side refuses first (see submit).
        child_settings = dataclasses.replace(settings, max_waiting_sequences=2**31)
        self._send(("start", {"model_dir": str(model_dir), "dtype": dtype, "quantize": quantize, "threads": threads,
                              "settings": dataclasses.asdict(child_settings), "adapters": self.adapter_paths}))
        try:
            self.info = self._wait_ready(start_timeout_s)
        except EngineStartError:
            self._conn.close()
            raise
        self._reader = threading.Thread(target=self._read, name="llmforge-engine-events", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise EngineStartError(f"the engine process exited with code {self._proc.returncode} while loading "
                                       f"the model (its log is above)")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise EngineStartError(f"the engine process did not load the model within {timeout:.0f}s")
        kind, payload = self._conn.recv()
        if kind == "error":
            self._proc.wait(30)
            raise EngineStartError(f"the engine process could not load the model: {payload}")
        return payload

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader finishes what was pending
                pass

    # ---- the Engine interface -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None], n: int = 1,
               adapter: str | None = None) -> _Handle:
        check_request(self.settings, self.adapter_paths, prompt_ids, params, adapter)
        with self._lock:
            if not self._accepting or self._dead:
                raise EngineStopped("the server is shutting down" if not self._dead else "the engine process has stopped")
            # Sequences that would wait in the child: what it last reported waiting, plus what it has not seen
            # yet and this request, beyond the rows that were free (none while others wait: admission is in order).
            unseen = self._sent - self._child_received
            free = 0 if self._stats["waiting"] else max(0, self.settings.max_batch_size - self._stats["running"])
            if self._stats["waiting"] + unseen + n - free > self.settings.max_waiting_sequences:
                raise QueueFull(f"{self._stats['waiting'] + max(0, unseen - free)} sequences are already waiting")
            rid = self._next_id
            self._next_id += 1
            self._requests[rid] = _Request(sink, n)
            self._sent += n
        self._send(("submit", rid, list(prompt_ids), params, n, adapter))
        return _Handle(self, rid)

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.poll() is None

    def stats(self) -> dict:
        return dict(self._stats)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let the child finish the ones in flight (up to ``drain_timeout`` s), then stop it."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        self._send(("shutdown", drain_timeout))
        try:
            self._proc.wait(drain_timeout + 20)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop in time: killing it")
            self._proc.kill()
            self._proc.wait(10)
        self._reader.join(timeout=10)
        self._conn.close()

    # ---- events from the child ----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "step":
                    self._deliver(*message[1:])
        except (EOFError, OSError):
            pass
        finally:
            self._dead = True
            code = self._proc.poll()
            if self._accepting and code not in (None, 0):
                log.error("the engine process exited with code %s", code)
            self._abort_pending()

    def _deliver(self, events: list, calls: list, stats: dict, received: int) -> None:
        with self._lock:
            self._stats, self._child_received = stats, received
        for rid, index, text, tokens, reason, logprobs, prompt_logprobs in events:
            request = self._requests.get(rid)
            if request is None:
                continue
            request.sink(Event(index, text, tokens, reason, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
            if reason is not None:
                request.done.add(index)
                if len(request.done) == request.n:
                    with self._lock:
                        del self._requests[rid]
        for name, args in calls:
            getattr(self.metrics, name)(*args)

    def _abort_pending(self) -> None:
        with self._lock:
            pending, self._requests = self._requests, {}
        for request in pending.values():
            for index in range(request.n):
                if index not in request.done:
                    request.sink(Event(index, "", 0, "abort"))


# ---- the child ------------------------------------------------------------------------------------------
class _Recorder(Metrics):
    """Metrics calls, kept for the next step message (the real metrics live in the replica)."""

    def __init__(self):
        self.calls: list = []

    def on_step(self, batch_size: int, queued: int) -> None:
        self.calls.append(("on_step", (batch_size, queued)))

    def on_first_token(self, seconds: float) -> None:
        self.calls.append(("on_first_token", (seconds,)))

    def on_finish(self, seconds: float, completion_tokens: int) -> None:
        self.calls.append(("on_finish", (seconds, completion_tokens)))


def _child(fd: int) -> int:
    import torch

    from llmforge.runtime import setup_logging
    from llmforge.serve.engine import Engine, load_model

    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C drains through the replica, which then stops this
    conn = Connection(fd)
    send_lock = threading.Lock()
    _, spec = conn.recv()
    try:
        if spec["threads"]:
            torch.set_num_threads(int(spec["threads"]))
        model, tokenizer = load_model(Path(spec["model_dir"]), spec["dtype"], spec["quantize"])
        recorder = _Recorder()
        outbox: collections.deque = collections.deque()  # the engine thread appends, flush() drains
        received = [0]
        counted = threading.Lock()  # the counters sent with each step agree with the submissions counted
        handles: dict[int, list] = {}  # request id -> [its handle, choices not ended yet]

        def flush() -> None:  # on the engine thread, after every step
            if not outbox and not recorder.calls:
                return
            events = [outbox.popleft() for _ in range(len(outbox))]
            calls, recorder.calls = recorder.calls, []
            with counted:  # a request's handle is stored in the same critical section as its submission
                for rid, _, _, _, reason, *_ in events:
                    if reason is not None and rid in handles:
                        handles[rid][1] -= 1  # choices still running: a cancel must reach them
                        if not handles[rid][1]:
                            del handles[rid]
                stats, taken = engine.stats(), received[0]
            with send_lock:
                conn.send(("step", events, calls, stats, taken))

        settings = EngineSettings(**spec["settings"])
        engine = Engine(model, tokenizer, settings, spec["adapters"], metrics=recorder, after_step=flush)
    except Exception as exc:  # the replica reports it; a traceback from here would not reach the user
        log.exception("the engine could not start")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return 1
    with send_lock:
        conn.send(("ready", {"pid": os.getpid()}))

    def sink_for(rid: int):
        return lambda e: outbox.append((rid, e.index, e.text, e.completion_tokens, e.finish_reason, e.logprobs,
                                        e.prompt_logprobs))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the replica is gone
            engine.shutdown(drain_timeout=0)
            return 0
        kind = message[0]
        if kind == "submit":
            _, rid, prompt_ids, params, n, adapter = message
            try:
                with counted:
                    received[0] += n
                    handles[rid] = [engine.submit(prompt_ids, params, sink_for(rid), n=n, adapter=adapter), n]
            except Exception as exc:  # checked on the replica's side already; never leave a request hanging
                log.error("request %d refused: %s", rid, exc)
                with send_lock:
                    conn.send(("step", [(rid, i, "", 0, "abort") for i in range(n)], [], engine.stats(), received[0]))
        elif kind == "cancel":
            entry = handles.get(message[1])
            if entry is not None:
                entry[0].cancel()
        elif kind == "shutdown":
            engine.shutdown(drain_timeout=message[1])
            flush()
            return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
