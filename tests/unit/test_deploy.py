"""The deployment files, checked offline: cluster.yaml with Ray's own validator, the Dockerfile against
pyproject.toml, and every manifest in k8s/ (ray.io/v1 objects against KubeRay's CRD schemas, core objects
for the fields Kubernetes and this project require)."""

import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = re.search(r"ray\[[^\]]*\]==([\d.]+)\.\*", " ".join(PYPROJECT["project"]["dependencies"])).group(1)
IMAGE = "ghcr.io/llmforge/llmforge"
IN_IMAGE = "/home/ray/llmforge/"  # where the Dockerfile puts jobs/ and configs/
CRDS_ENV = "LLMFORGE_KUBERAY_CRDS"
# The Secrets the manifests reference; docs/deployment.md says how to create each. None is committed.
SECRETS = {"llmforge-s3", "llmforge-s3-read", "llmforge-ray-token", "llmforge-api-key", "llmforge-mlflow-db"}


# ---------------------------------------------------------------- cluster launcher

def _cluster_config(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validation():
    config = _cluster_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}, "a serving (1 GPU) and a training (8 GPU) type"
    for name, node_type in types.items():
        assert "CPU" in node_type["resources"], f"{name}: explicit resources, or `ray up` asks EC2"
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert config["docker"]["image"] == f"{IMAGE}:{VERSION}"
    assert config["idle_timeout_minutes"] > 0
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start


def test_cluster_yaml_validation_catches_mistakes():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu_serve"]["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        _cluster_config(typo)
    bad_head = copy.deepcopy(raw)
    bad_head["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        _cluster_config(bad_head)


# ---------------------------------------------------------------- image

def test_dockerfile_matches_the_project():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_PIN)}\.\d+-py3\d+-gpu", base), base
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    lo, hi = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text()).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    assert as_tuple(lo) <= as_tuple(torch) < as_tuple(hi)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "runs" in ignored


# ---------------------------------------------------------------- k8s

def _kustomize_by_hand(root: Path) -> list[dict]:
    """What `kubectl kustomize` does with this kustomization (resources, namespace, labels, image tags)."""
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    tags = {i["name"]: i.get("newName", i["name"]) + ":" + i["newTag"] for i in kust.get("images", [])}
    docs = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((root / name).read_text()):
            if doc is None:
                continue
            if doc["kind"] != "Namespace" and kust.get("namespace"):
                doc["metadata"]["namespace"] = kust["namespace"]
            for label in kust.get("labels", []):
                doc["metadata"].setdefault("labels", {}).update(label["pairs"])
            docs.append(doc)
    text = yaml.safe_dump_all(docs)
    for name, image in tags.items():
        text = re.sub(rf"image: {re.escape(name)}(:\S+)?", f"image: {image}", text)
    return list(yaml.safe_load_all(text))


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    kubectl = shutil.which("kubectl")
    by_hand = _kustomize_by_hand(REPO / "k8s")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(REPO / "k8s")], capture_output=True, text=True, check=True)
        rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
        key = lambda d: (d["kind"], d["metadata"]["name"])
        assert sorted(map(key, rendered)) == sorted(map(key, by_hand))
        return rendered
    return by_hand


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a manifest, KubeRay's included."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(kind, spec["template"]["spec"])]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(kind)
    pods = []
    if cluster:
        pods.append((f"{kind} head", cluster["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{kind} {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        pods.append((f"{kind} submitter", spec["submitterPodTemplate"]["spec"]))
    return pods


def test_manifests_build_and_cover_the_topology(manifests):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests}
    assert {("RayCluster", "llmforge"), ("RayJob", "pretrain-deepseek-1b"), ("RayService", "llmforge"),
            ("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "mlflow-db")} <= kinds
    for doc in manifests:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "llmforge"


def test_no_secret_values_committed(manifests):
    assert not [d for d in manifests if d["kind"] == "Secret"]
    text = "\n".join(p.read_text() for p in (REPO / "k8s").glob("*.yaml"))
    referenced = set(re.findall(r"secretName: (\S+)", text)) | set(re.findall(r"secretKeyRef: \{name: ([\w-]+)", text)) \
        | set(re.findall(r"secretRef: \{name: ([\w-]+)", text))
    assert referenced == SECRETS
    deployment_doc = (REPO / "docs" / "deployment.md").read_text()
    for name in SECRETS:
        assert f"create secret generic {name}" in deployment_doc, f"docs/deployment.md must say how to create {name}"


def test_every_container_is_limited_probed_and_unprivileged(manifests):
    images = set()
    for doc in manifests:
        for where, pod in _pod_specs(doc):
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, where
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                name = f"{where}/{c['name']}"
                images.add(c["image"])
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), f"{name}: resources.{part}"
                if "submitter" not in where:  # a run-to-completion Job pod has nothing to probe
                    assert c.get("readinessProbe") and c.get("livenessProbe"), f"{name}: probes"
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities") == {"drop": ["ALL"]}, name
                assert sc.get("readOnlyRootFilesystem") is True, name
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"
                for mount in mounts.values():
                    assert mount in volumes or any(t["metadata"]["name"] == mount for t in
                                                   doc["spec"].get("volumeClaimTemplates", [])), f"{name}: {mount}"
            if where.startswith("Ray") and "submitter" not in where:
                dshm = volumes.get("dshm", {}).get("emptyDir", {})
                assert dshm.get("medium") == "Memory", f"{where}: /dev/shm"
            gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
            if any(gpus):
                assert pod.get("nodeSelector") and any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), where
    assert {i for i in images if i.startswith(IMAGE)} == {f"{IMAGE}:{VERSION}", f"{IMAGE}-vllm:{VERSION}"}
    assert all(":" in i and not i.endswith(":latest") for i in images), images


def test_services_select_pods_and_stay_inside(manifests):
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {}) for d in manifests
                  if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in manifests if d["kind"] == "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "nothing exposed outside the cluster by default"
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
    for doc in manifests:
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert cluster["authOptions"] == {"mode": "token", "secretName": "llmforge-ray-token"}
            assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
            assert cluster["rayVersion"].startswith(RAY_PIN + ".")
    assert not [d for d in manifests if d["kind"] == "Ingress"]


def test_ray_cluster_autoscales(manifests):
    cluster = next(d for d in manifests if d["kind"] == "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["gpu-train"]["minReplicas"] == 0 < groups["gpu-train"]["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _in_repo(path: str) -> Path:
    assert path.startswith(IN_IMAGE), path
    return REPO / path[len(IN_IMAGE):]


def test_rayjob_runs_the_pretraining_job_with_a_valid_config(manifests):
    from llmforge.config import load_config, parse_overrides
    job = next(d for d in manifests if d["kind"] == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and _in_repo(argv[1]) == REPO / "jobs" / "pretrain.py"
    config = _in_repo(argv[argv.index("--config") + 1])
    rest = [a for i, a in enumerate(argv[2:], 2) if a != "--config" and argv[i - 1] != "--config"]
    cfg = load_config(str(config), parse_overrides(rest))  # raises on a typo'd or invalid field
    assert cfg.train.run_name, "a fixed run name, so a retried job continues from its checkpoints"
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.dataset.startswith("s3://")
    workers = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                  for g in job["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.num_workers == workers, "one Ray Train worker per GPU of the job's cluster"


def test_rayservice_serve_config_builds_a_valid_app_config(manifests):
    import importlib
    from llmforge.serve.app import _args_to_config
    service = next(d for d in manifests if d["kind"] == "RayService")["spec"]
    [app] = yaml.safe_load(service["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = dict(app["args"])
    args["config"] = str(_in_repo(args["config"]))
    cfg = _args_to_config(args)
    assert cfg.serve.model.startswith("models:/") and cfg.serve.num_gpus == 1
    assert cfg.serve.autoscaling.max_replicas > cfg.serve.autoscaling.min_replicas >= 1
    # vLLM on the GPU group, from the image's vLLM variant (every pod of the service: the app is built on the head).
    assert cfg.serve.engine == "vllm"
    for _, pod in _pod_specs(next(d for d in manifests if d["kind"] == "RayService")):
        assert all(c["image"].startswith(f"{IMAGE}-vllm:") for c in pod["containers"])


def test_rayservice_vllm_config_passes_ray_serve_llms_own_validation(manifests):
    from llmforge.serve import vllm_engine
    from llmforge.serve.app import _args_to_config
    if vllm_engine.missing():
        pytest.skip("vLLM is not installed here (make vllm): Ray Serve LLM's config validation needs it")
    [app] = yaml.safe_load(next(d for d in manifests if d["kind"] == "RayService")["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"])
    args["config"] = str(_in_repo(args["config"]))
    cfg = _args_to_config(args).serve
    kwargs = vllm_engine.engine_kwargs(cfg, None, {}, gpu=True)
    llm = vllm_engine.build_llm_config(cfg, {"max_ongoing_requests": cfg.max_ongoing_requests}, kwargs, cfg.model)
    engine = llm.get_engine_config()  # Ray Serve LLM's VLLMEngineConfig: vLLM's arguments, placement, accelerator
    assert engine.placement_bundles == [{"GPU": 1.0, "CPU": float(cfg.num_cpus)}]
    assert engine.engine_kwargs["dtype"] == "bfloat16" and engine.engine_kwargs["gpu_memory_utilization"] == 0.9


# ---------------------------------------------------------------- KubeRay CRD schemas

def _strict(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema, rejecting unknown fields the way `kubectl apply
    --validate=strict` does (the API server would otherwise drop them silently)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()
           if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@pytest.fixture(scope="module")
def crd_validators():
    crd_dir = os.environ.get(CRDS_ENV)
    if not crd_dir:
        pytest.skip(f"SKIPPED: {CRDS_ENV} is not set, so the ray.io/v1 manifests were NOT checked against KubeRay's "
                    f"CRDs (.ci/run sets it to ../shared/kuberay-crds)")
    import jsonschema
    validators = {}
    for path in Path(crd_dir).glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    assert {"RayCluster", "RayJob", "RayService"} <= set(validators), f"CRDs missing in {crd_dir}"
    return validators


def _errors(validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_ray_manifests_match_kuberay_crds(manifests, crd_validators):
    ray_docs = [d for d in manifests if d["apiVersion"] == "ray.io/v1"]
    assert len(ray_docs) == 3
    for doc in ray_docs:
        assert _errors(crd_validators[doc["kind"]], doc) == [], doc["metadata"]["name"]


def test_crd_check_rejects_typos_and_wrong_types(manifests, crd_validators):
    cluster = copy.deepcopy(next(d for d in manifests if d["kind"] == "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    cluster["spec"]["authOptions"]["mode"] = "password"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["8"]
    errors = _errors(crd_validators["RayCluster"], cluster)
    assert any("maxReplica" in e for e in errors)
    assert any("authOptions.mode" in e for e in errors)
    assert any("limits.cpu" in e for e in errors)
    job = copy.deepcopy(next(d for d in manifests if d["kind"] == "RayJob"))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in _errors(crd_validators["RayJob"], job))


# ---------------------------------------------------------------- network policies

def _selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
    return True


def _peer_matches(peer: dict, end: dict) -> bool:
    if end.get("external"):
        return False  # only an ipBlock peer (none here) or a rule without peers admits addresses outside the cluster
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": end["ns"]}):
            return False
    elif end["ns"] != "llmforge":
        return False
    return _selects(peer.get("podSelector", {}), end["labels"])


def _rule_admits(rule: dict, side: str, end: dict, port: int) -> bool:
    peers = rule.get(side)
    ports = rule.get("ports")
    return (peers is None or any(_peer_matches(p, end) for p in peers)) and \
        (ports is None or any(p.get("port") == port for p in ports))


def allowed(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics: a connection needs the destination's ingress (if any policy selects
    it for Ingress) and the source's egress (likewise) to admit it."""
    def direction_ok(end: dict, other: dict, kind: str, side: str) -> bool:
        if end.get("external") or end["ns"] != "llmforge":
            return True
        selecting = [p for p in policies if kind in p["spec"]["policyTypes"]
                     and _selects(p["spec"]["podSelector"], end["labels"])]
        return not selecting or any(_rule_admits(r, side, other, port)
                                    for p in selecting for r in p["spec"].get(kind.lower(), []))
    return direction_ok(dst, src, "Ingress", "from") and direction_ok(src, dst, "Egress", "to")


def test_network_policies_open_only_the_needed_paths(manifests):
    policies = [d for d in manifests if d["kind"] == "NetworkPolicy"]
    pod = lambda **labels: {"ns": "llmforge", "labels": {"app.kubernetes.io/part-of": "llmforge", **labels}}
    train, serve, submit = (pod(**{"llmforge.dev/workload": w}) for w in ("train", "serve", "submit"))
    mlflow, db, other = pod(**{"app.kubernetes.io/name": "mlflow"}), pod(**{"app.kubernetes.io/name": "mlflow-db"}), pod()
    elsewhere = {"ns": "apps", "labels": {"app": "client"}}
    operator = {"ns": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
    s3 = {"external": True}
    dns = {"ns": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    open_paths = [(train, train, 6379), (train, train, 41234), (serve, serve, 6379), (train, mlflow, 5000),
                  (serve, mlflow, 5000), (mlflow, db, 5432), (train, s3, 443), (mlflow, s3, 443),
                  (elsewhere, serve, 8000), (operator, train, 8265), (operator, serve, 52365), (submit, train, 8265),
                  (other, dns, 53), (serve, dns, 53)]
    closed_paths = [(other, mlflow, 5000), (elsewhere, mlflow, 5000), (submit, mlflow, 5000), (serve, db, 5432),
                    (train, db, 5432), (other, db, 5432), (elsewhere, train, 6379), (serve, train, 6379),
                    (train, serve, 6379), (elsewhere, train, 10001), (other, s3, 443), (db, s3, 443),
                    (submit, s3, 443), (elsewhere, mlflow, 443)]
    for src, dst, port in open_paths:
        assert allowed(policies, src, dst, port), (src, dst, port)
    for src, dst, port in closed_paths:
        assert not allowed(policies, src, dst, port), (src, dst, port)


def test_every_pod_carries_the_labels_the_policies_use(manifests):
    def pod_templates(doc):
        spec = doc.get("spec", {})
        if doc["kind"] == "RayCluster":
            yield "train", spec["headGroupSpec"]["template"]
            yield from (("train", g["template"]) for g in spec["workerGroupSpecs"])
        elif doc["kind"] == "RayJob":
            yield "submit", spec["submitterPodTemplate"]
            cluster = spec["rayClusterSpec"]
            yield "train", cluster["headGroupSpec"]["template"]
            yield from (("train", g["template"]) for g in cluster["workerGroupSpecs"])
        elif doc["kind"] == "RayService":
            cluster = spec["rayClusterConfig"]
            yield "serve", cluster["headGroupSpec"]["template"]
            yield from (("serve", g["template"]) for g in cluster["workerGroupSpecs"])
    seen = set()
    for doc in manifests:
        for workload, template in pod_templates(doc):
            assert template["metadata"]["labels"]["llmforge.dev/workload"] == workload, doc["kind"]
            seen.add(workload)
            secrets = {ref["secretRef"]["name"] for c in template["spec"]["containers"]
                       for ref in c.get("envFrom", []) if "secretRef" in ref}
            if workload == "serve":  # client-facing: no S3 write key, at most the optional read-only one
                assert "llmforge-s3" not in secrets and secrets <= {"llmforge-s3-read"}, secrets
    assert seen == {"train", "serve", "submit"}
