"""Real components on 127.0.0.1, started by the tests and stopped by PID: moto_server (S3) and one
local Ray cluster per session."""

import os
import signal
import socket
import subprocess
import threading
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "platform" / "llmforge" / "sample_data" / "corpus.jsonl.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_tree(proc: subprocess.Popen, marker: str) -> None:
    """Stop a process group and anything else whose command line holds ``marker`` (Ray's own daemons,
    which leave the group)."""
    import psutil
    stop(proc)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=10)


class NodeCluster:
    """tests/integration/multinode.py in a process of its own: a head that takes no work and 1-CPU worker
    nodes that the test adds and removes (see that file for the commands)."""

    def __init__(self, workdir: Path, nodes: int):
        import tempfile
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/raymn")  # short: Ray's socket paths have a length limit
        self.log = workdir / "multinode.log"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "multinode.py"), self.temp_dir,
                                      str(nodes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w"), text=True, start_new_session=True,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            self.address = self._answer(120)["address"]
        except Exception:
            self.close()
            raise

    def _answer(self, timeout: float) -> dict:
        import json
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the multi-node cluster did not answer: {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ask(self, command: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout)
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        import shutil
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_tree(self.proc, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture()
def multinode(tmp_path):
    """A 3-node Ray cluster on this machine: a head with no CPU for work and two 1-CPU nodes."""
    cluster = NodeCluster(tmp_path, nodes=2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server; AWS_* variables point at it (set before Ray starts, so workers see them)."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc)
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    import boto3
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(ray_cluster, tmp_path_factory):
    """The bundled sample corpus, prepared once per session."""
    from llmforge.config import load_config
    from llmforge.data.pipeline import prepare
    out = tmp_path_factory.mktemp("datasets") / "sample"
    manifest = prepare([str(SAMPLE)], str(out), load_config(None, {"data.seq_len": 128, "data.tokenizer.vocab_size": 2000}))
    return out, manifest


@pytest.fixture()
def mlflow_server(s3, tmp_path):
    """`mlflow server` (1 worker) with runs in SQLite and artifacts proxied to the moto bucket `mlflow`."""
    s3.create_bucket(Bucket="mlflow")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", "s3://mlflow/artifacts"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=120)
        yield url
    finally:
        stop(proc)


class TcpProxy:
    """A TCP forwarder to ``target`` on a fixed local port that can be taken down and brought back, to
    make an endpoint unreachable for a while without losing what the server behind it holds."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            server.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture()
def s3_proxy(s3_endpoint):
    host, port = s3_endpoint.rsplit("/", 1)[1].split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
