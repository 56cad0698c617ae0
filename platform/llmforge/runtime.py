"""Starting or joining Ray, and the process-wide logging set-up shared by every job."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from llmforge.config import RayConfig

log = logging.getLogger("llmforge")
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the dir that holds this llmforge (a checkout's platform/)


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    quiet_library_notices()


def quiet_library_notices() -> None:
    """Silence notices that third-party code raises on llmforge's behalf and no user can act on (each names
    the library call that raises it). Called in the driver, Train workers and replicas."""
    for message in (
        # DeepSpeed's ZeRO all-gather, inside its engine.
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        # peft's get_peft_model asks the HF model for the old name.
        r"`is_gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    deepspeed_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedSchedulerNotice) for f in deepspeed_log.filters):  # called once per restart
        deepspeed_log.addFilter(_DeepSpeedSchedulerNotice())


def deepspeed_accelerator() -> None:
    """Call before importing DeepSpeed: on a host without CUDA, name its CPU accelerator, which it would
    otherwise pick itself with a warning in every process."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _DeepSpeedSchedulerNotice(logging.Filter):
    """DeepSpeed's WarmupCosineLR calls its own get_lr() in its constructor, before its first step, and so
    warns "Attempting to get learning rate from scheduler before it has started" on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "get learning rate from scheduler before it has started" not in record.getMessage()


def ensure_ray(cfg: RayConfig, dashboard: bool = True) -> None:
    """Join the cluster at ``ray.address`` / ``RAY_ADDRESS``, or start a local one in this process.

    Workers import llmforge from the same dir as the driver (``PACKAGE_PARENT`` first on their
    ``PYTHONPATH``), so a job submitted with ``--working-dir .`` runs the checkout's code on every node,
    also where the image has llmforge installed. A local cluster gets its dashboard on 127.0.0.1: Ray
    Train's placement-group cleaner polls the State API the dashboard serves (without it, it warns once
    a second for the whole run), and the dashboard shows the job's progress. ``dashboard=False`` leaves it
    out where nothing in the process needs it (``llmforge prepare`` on its own: Ray Data logs its progress,
    and the dashboard's processes cost seconds of a short job's start).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    pythonpath = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    if address is not None:
        log.info("joining Ray at %s", address)
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True)
        return
    # A local Ray's raylet and workers are this process's children and inherit its environment: set here, not
    # as a runtime_env, PYTHONPATH lets Ray use the workers it starts with the cluster (a runtime_env makes it
    # start others at the first task: 2 s of a short job).
    os.environ["PYTHONPATH"] = pythonpath
    if not dashboard:
        ray.init(log_to_driver=True, include_dashboard=False)
        log.info("started a local Ray in this process (%d CPUs)", int(ray.cluster_resources().get("CPU", 0)))
        return
    context = ray.init(log_to_driver=True, include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("started a local Ray in this process (%d CPUs); dashboard: http://%s",
             int(ray.cluster_resources().get("CPU", 0)), context.dashboard_url)


@contextlib.contextmanager
def quiet_ray_data():
    """Hold Ray Data's own logging at warnings for a short data step that logs its own progress: its
    execution plans and progress blocks are a dozen lines per pass and would bury the step's lines."""
    import ray.data  # noqa: F401  (it configures its loggers on import: set the level after that)

    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray_data_log.setLevel(level)


def disconnect_ray() -> None:
    """Disconnect from Ray so that no forwarded worker log line lands after a job's summary line."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()
