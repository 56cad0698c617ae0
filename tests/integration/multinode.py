"""A Ray cluster of several nodes on this one machine (``ray.cluster_utils.Cluster``: one raylet per node),
run in its own process so that it never meets the test session's own Ray.

Driven by lines on stdin, each answered by one JSON line on stdout:
  add                    a worker node with 1 CPU  -> {"node": ID}
  remove-training-node   the node that hosts a Ray Train worker, killed without warning, as a lost machine
                         is                        -> {"node": ID, "worker_pid": PID}  (or {"error": ...})
The first line it prints is {"address": GCS_ADDRESS}. EOF (or ``quit``) shuts the whole cluster down.

Usage: python multinode.py TEMP_DIR NUM_WORKER_NODES
"""

import json
import os
import socket
import sys


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def train_worker_pids() -> list[int]:
    """Ray Train's worker processes on this machine (Ray titles actor processes ``ray::CLASS[.method]``)."""
    import psutil
    return [p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]


def _training_node(cluster) -> tuple[object, int] | None:
    """The worker node (not the head) one of whose processes is a Ray Train worker, and that process."""
    import psutil
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.worker_nodes}
    for pid in train_worker_pids():
        try:
            for parent in psutil.Process(pid).parents():
                if parent.pid in raylets:
                    return raylets[parent.pid], pid
        except psutil.NoSuchProcess:
            continue
    return None


def main() -> None:
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    temp_dir, count = sys.argv[1], int(sys.argv[2])
    node_args = {"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False}
    # Every Ray process of this cluster, the head's included, must find this cluster and not another one on
    # the machine (the test session's): the GCS port is chosen first so RAY_ADDRESS can be set before any starts.
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    # The head takes no work: training workers land only on the nodes the test adds and removes.
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 0, "gcs_server_port": port})
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    try:
        for _ in range(count):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        _emit({"address": cluster.address})
        for line in sys.stdin:
            command = line.strip()
            if command == "add":
                node = cluster.add_node(**node_args)
                cluster.wait_for_nodes()
                _emit({"node": node.node_id})
            elif command == "remove-training-node":
                found = _training_node(cluster)
                if found is None:
                    _emit({"error": "no Ray Train worker runs on a worker node"})
                    continue
                node, pid = found
                cluster.remove_node(node, allow_graceful=False)
                _emit({"node": node.node_id, "worker_pid": pid})
            elif command == "quit":
                break
            else:
                _emit({"error": f"unknown command {command!r}"})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
