"""llmforge installed the way the cluster image installs it (a wheel, not editable, no checkout beside it):
its sample-data defaults work; and a checkout's jobs/ run the checkout's code even with that copy installed
(`ray job submit --working-dir .` on the image)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A site dir holding llmforge built from this checkout as a wheel (the image's `pip install .`)."""
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(REPO, build / "src", ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.egg-info",
                                                                         "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(build / "src")], check=True, timeout=300)
    return site


def run_isolated(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Python with ``site`` as the only place llmforge can come from (no checkout on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-S", "-c", f"import site; site.main(); {code}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_installed_package_carries_its_sample_data(installed, tmp_path):
    done = run_isolated(
        "import json, llmforge, llmforge.samples as s; "
        "print(json.dumps({'pkg': llmforge.__file__, 'files': {n: str(s.sample_file(n)) for n in "
        "('corpus.jsonl.gz', 'chat.jsonl', 'quickstart.yaml', 'quickstart-lora.yaml', 'README.md')}}))",
        installed, tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["pkg"].startswith(str(installed))
    for name, path in found["files"].items():
        assert path.startswith(str(installed)) and Path(path).stat().st_size > 0, name
    # The quickstart's shipped configs validate as they are.
    done = run_isolated("from llmforge.config import load_config; from llmforge.samples import sample_file; "
                        "print(load_config(sample_file('quickstart.yaml')).model.preset, "
                        "load_config(sample_file('quickstart-lora.yaml')).finetune.merge)", installed, tmp_path)
    assert done.stdout.split() == ["deepseek-tiny", "True"], done.stderr


def test_a_checkouts_jobs_run_the_checkouts_code_over_an_installed_copy(installed, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "jobs", checkout / "jobs")
    shutil.copytree(REPO / "platform" / "llmforge", checkout / "platform" / "llmforge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "platform" / "llmforge" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "edited-'))

    done = run_isolated(
        f"import sys, json; sys.path.insert(0, {str(checkout / 'jobs')!r}); import _bootstrap; "
        "import llmforge, llmforge.runtime as r; "
        "print(json.dumps({'version': llmforge.__version__, 'file': llmforge.__file__, "
        "'workers_get': str(r.PACKAGE_PARENT)}))", installed, tmp_path)
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    assert ran["version"].startswith("edited-")
    assert ran["file"] == str(checkout / "platform" / "llmforge" / "__init__.py")
    assert ran["workers_get"] == str(checkout / "platform")  # first on every Ray worker's PYTHONPATH
    assert "running the checkout's code" in done.stderr and str(installed / "llmforge") in done.stderr

    # A local Ray started by the job (ensure_ray): its workers import the checkout's llmforge too (they inherit
    # the driver's PYTHONPATH, the checkout first), not the installed one.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(installed)
    worker = subprocess.run([sys.executable, "-c", (
        f"import sys, json; sys.path.insert(0, {str(checkout / 'jobs')!r}); import _bootstrap; import ray; "
        "from llmforge.config import RayConfig; from llmforge.runtime import ensure_ray; "
        "ensure_ray(RayConfig(), dashboard=False); "
        "f = ray.remote(lambda: __import__('llmforge').__file__).options(num_cpus=0); "
        "print(json.dumps({'worker_file': ray.get(f.remote(), timeout=60)})); ray.shutdown()")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout.strip().splitlines()[-1])["worker_file"] == str(
        checkout / "platform" / "llmforge" / "__init__.py")

    # A job entry point end to end: the edited checkout's CLI answers (its version), not the installed one.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    cli = subprocess.run([sys.executable, str(checkout / "jobs" / "pretrain.py"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "examples:" in cli.stdout and "the llmforge installed at" in cli.stderr
