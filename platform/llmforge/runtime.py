"""Starting or joining Ray, and the process-wide logging set-up shared by every job."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from llmforge.config import RayConfig

log = logging.getLogger("llmforge")
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the `platform/` dir


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


def ensure_ray(cfg: RayConfig) -> None:
    """Join the cluster at ``ray.address`` / ``RAY_ADDRESS``, or start a local one in this process.

    Workers import llmforge from the same ``platform/`` dir as the driver, so a job submitted with
    ``--working-dir .`` works on a cluster where llmforge is not installed.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}}
    log.info("starting Ray: %s", address or "a local cluster in this process")
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
             include_dashboard=False if address is None else None)
