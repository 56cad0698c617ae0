"""Where the corpus pipeline's tasks run (``data.executor``): Ray tasks, or a pool of processes on this machine.

Both run the same module-level task functions of :mod:`llmforge.data.pipeline`, one CPU each
(:func:`limit_threads`), and give back their rows in item order; only the scheduling differs. Ray is what scales
out (a cluster, the object store spilling to disk, retried tasks); a local Ray also costs seconds to start and
stop (GCS, raylet, agents, worker processes: 4-5 s of a 2-core machine), which is most of a prepare of a few
thousand documents, where a pool of processes starts in under one. ``auto`` takes the pool only when nothing
asks for a cluster and the input is small (:func:`choose`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
import time

import pyarrow as pa

from llmforge.config import DataConfig, RayConfig

log = logging.getLogger("llmforge.data.pipeline")  # its lines are the pipeline's progress


def limit_threads(cpus: int) -> None:
    """Keep this process's native thread pools to ``cpus`` threads, as Ray does for OpenMP: HF tokenizers'
    ``encode_batch`` (Rust, rayon) and Arrow otherwise start one thread per core of the machine, so a task of one
    CPU used two on a 2-core node and two tasks took four threads. Before the pools' first use."""
    os.environ["RAYON_NUM_THREADS"] = str(cpus)
    if cpus == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pa.set_cpu_count(cpus)


def choose(cfg: DataConfig, ray_cfg: RayConfig, input_bytes: int) -> str:
    """``ray`` or ``local`` for ``data.executor``: ``auto`` is ``local`` only when no Ray cluster is given
    (``ray.address``, ``RAY_ADDRESS``, as in a ``ray job submit``) or already connected, and the input is at most
    ``data.local_max_mb``."""
    if cfg.executor != "auto":
        return cfg.executor
    ray = sys.modules.get("ray")  # not imported: not connected either (and its import costs half a second)
    if (ray is not None and ray.is_initialized()) or ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "local" if input_bytes <= cfg.local_max_mb * 1_000_000 else "ray"


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _on_one_cpu(fn):
    def run(*args):
        limit_threads(1)
        return fn(*args)
    run.__name__ = run.__qualname__ = fn.__name__  # the task's name in Ray's dashboard and errors
    return run


def _first_of(fn):
    def run(*args):
        return fn(*args)[0]
    run.__name__ = run.__qualname__ = fn.__name__
    return run


class RayTasks:
    """Tasks of one CPU on the Ray cluster this process is connected to."""

    name = "ray"

    @property
    def cpus(self) -> int:
        import ray
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn, items: list, *args, what: str = "files", progress_s: float = 10.0) -> list[dict]:
        """``fn([item], *args)`` as a Ray task of one CPU per item (each reads, processes and writes its item,
        without passing rows through the object store): the rows of all, in item order; a progress line every
        ``progress_s`` seconds while tasks are left."""
        import ray

        task = ray.remote(_on_one_cpu(fn)).options(num_cpus=1)
        refs = [ray.put(a) for a in args]  # once, not once per task (the drop list can be large)
        pending = [task.remote([item], *refs) for item in items]
        results = list(pending)
        started = last = time.time()
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=progress_s)
            if pending and time.time() - last >= progress_s:
                last = time.time()
                log.info("  %s: %d/%d tasks done (%.0f s)", what, len(items) - len(pending), len(items), last - started)
        return [row for rows in ray.get(results) for row in rows]

    def map_reduce(self, map_fn, chunks: list, map_args: tuple, reduce_fn, reduce_args: tuple,
                   partitions: int) -> list:
        """``map_fn(chunk, *map_args, partitions)`` gives one value per partition; ``reduce_fn(*reduce_args,
        *values)`` runs once per partition over every map task's value for it. The values travel through the
        object store (spilled to disk when large); the driver gets only the reduce results."""
        import ray

        reduce = ray.remote(_on_one_cpu(reduce_fn)).options(num_cpus=1)
        if partitions == 1:  # one return value is the value itself, not a list of one
            task = ray.remote(_on_one_cpu(_first_of(map_fn))).options(num_cpus=1)
            mapped = [[task.remote(chunk, *map_args, 1)] for chunk in chunks]
        else:
            task = ray.remote(_on_one_cpu(map_fn)).options(num_returns=partitions, num_cpus=1)
            mapped = [task.remote(chunk, *map_args, partitions) for chunk in chunks]
        return ray.get([reduce.remote(*reduce_args, *(refs[p] for refs in mapped)) for p in range(partitions)])

    def close(self) -> None:
        pass


class LocalProcesses:
    """A pool of ``cpus`` spawned processes on this machine (each one CPU's threads). A spawning pool starts its
    processes on demand, one per task submitted while none is idle, so they start with the first step's tasks
    and import the pipeline then; arguments and results travel pickled, so this is for inputs that fit one
    machine (``data.local_max_mb``). A task's error stops the others and is raised as
    it is (an :class:`InputError` stays one); the pool is done then."""

    name = "local"

    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or local_cpus()
        # spawn, not fork: the driver's Arrow and tokenizer thread pools do not survive a fork
        self._pool = cf.ProcessPoolExecutor(self.cpus, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=limit_threads, initargs=(1,))

    def map(self, fn, items: list, *args, what: str = "files", progress_s: float = 10.0) -> list[dict]:
        """:meth:`RayTasks.map` on the pool."""
        futures = [self._pool.submit(fn, [item], *args) for item in items]
        started = last = time.time()
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=progress_s, return_when=cf.FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:  # raised now, as it is, and the other tasks stopped: the job has failed
                self._abort()
                raise failed.exception()
            if pending and time.time() - last >= progress_s:
                last = time.time()
                log.info("  %s: %d/%d tasks done (%.0f s)", what, len(items) - len(pending), len(items), last - started)
        return [row for f in futures for row in f.result()]

    def map_reduce(self, map_fn, chunks: list, map_args: tuple, reduce_fn, reduce_args: tuple,
                   partitions: int) -> list:
        """:meth:`RayTasks.map_reduce` on the pool (the map values pass through this process)."""
        mapped = [f.result() for f in [self._pool.submit(map_fn, chunk, *map_args, partitions) for chunk in chunks]]
        found = [self._pool.submit(reduce_fn, *reduce_args, *(m[p] for m in mapped)) for p in range(partitions)]
        return [f.result() for f in found]

    def _abort(self) -> None:
        running = list((self._pool._processes or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in running:
            proc.kill()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
