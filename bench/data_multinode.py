"""The corpus pipeline on a multi-node test cluster: 2 nodes against 1, same corpus, same tokenizer, one run.

    python bench/data_multinode.py [--mb 20] [--nodes 1,2] [--workdir DIR]

Each cluster is ``ray.cluster_utils.Cluster`` on this machine (``tests/integration/multinode.py``: a head that
takes no work and N worker nodes of 1 CPU each, one raylet per node, in a process of its own); the job is
``jobs/prepare_data.py --ray.address ADDRESS --data.tokenizer.path DIR``, the tokenizer trained beforehand on the
sample corpus, timed from its start to its end (Ray joined, not started). The corpus is
``bench/data_throughput.py``'s generator, dealt into 8 files. On a machine with 2 cores, 2 one-CPU nodes use
both, and the driver, GCS and raylets share them: the figure is a floor for nodes on machines of their own.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "platform"))

from data_throughput import generate  # noqa: E402


def corpus(out: Path, mb: int) -> tuple[int, int]:
    raw = out.parent / f"{out.name}-raw"
    generate(raw, mb)
    lines = [line for f in sorted(raw.glob("*.jsonl")) for line in open(f, encoding="utf-8")]
    shutil.rmtree(raw)
    out.mkdir(parents=True)
    handles = [open(out / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(8)]
    for i, line in enumerate(lines):
        handles[i % 8].write(line)
    for h in handles:
        h.close()
    return len(lines), sum(len(line.encode()) for line in lines)


def run_on_cluster(nodes: int, work: Path, data: Path, tokenizer: Path, env: dict) -> float:
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "multinode.py"), str(temp),
                                str(nodes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = cluster.stdout.readline()
        if not line:
            raise SystemExit(f"the {nodes}-node cluster did not start")
        address = json.loads(line)["address"]
        out = work / f"out-{nodes}"
        t0 = time.time()
        with open(work / f"prepare-{nodes}.log", "w") as log:
            proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", str(data),
                                   "--output", str(out), f"--ray.address={address}",
                                   f"--data.tokenizer.path={tokenizer}"], stdout=log, stderr=subprocess.STDOUT,
                                  env={**env, "RAY_ADDRESS": address}, timeout=3600)
        seconds = time.time() - t0
        if proc.returncode:
            raise SystemExit(f"prepare on {nodes} node(s) failed; see {work / f'prepare-{nodes}.log'}")
        return seconds
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=120)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--nodes", default="1,2")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmforge-multinode-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    tok = work / "tok"
    subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input",
                    str(ROOT / "platform" / "llmforge" / "sample_data" / "corpus.jsonl.gz"), "--output", str(tok),
                    "--data.tokenizer.vocab_size=8192"], check=True, env=env, capture_output=True, timeout=1800)
    docs, nbytes = corpus(work / "corpus", args.mb)
    seconds = {int(n): run_on_cluster(int(n), work, work / "corpus", tok / "tokenizer", env)
               for n in args.nodes.split(",")}
    base = min(seconds)
    print(json.dumps({
        "bench": "data_multinode", "mb": round(nbytes / 1e6, 1), "docs": docs, "machine_cpus": os.cpu_count(),
        "cpus_per_node": 1, **{f"nodes_{n}_s": round(s, 1) for n, s in seconds.items()},
        **{f"nodes_{n}_over_{base}": round(seconds[base] / s, 2) for n, s in seconds.items() if n != base},
        **{f"nodes_{n}_docs_per_s": round(docs / s, 1) for n, s in seconds.items()},
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
