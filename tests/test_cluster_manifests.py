"""The cluster files are checked, not just written: every KubeRay object validates against the KubeRay
v1.7.0 CRDs' openAPIV3Schema (with unknown fields rejected, as the API server's strict field
validation does), every core object against Kubernetes' own schemas (`kubernetes-validate --strict`),
the Ray launcher YAMLs against Ray's cluster schema, and the settings that must agree (GPU group size
and the trainer's elastic range, security defaults, job entrypoints) agree."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raylm.config import load_config
from tests.conftest import CONFIGS, REPO

KUBERAY = REPO / "cluster" / "kuberay"
RAY_UP = REPO / "cluster" / "ray-up"
JOBS = REPO / "jobs"
K8S_VERSION = "1.33.0"
CUSTOM_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
STAGE_JOBS = ("curate", "tokenize", "pretrain", "tune", "finetune", "eval", "pipeline")


def job_file(stage: str) -> str:
    """The entrypoint of a stage: `jobs/<stage>.py`, but `tokenization.py` (a `tokenize.py` would shadow the stdlib)."""
    return "tokenization.py" if stage == "tokenize" else f"{stage}.py"


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def strict_schema(schema: dict) -> dict:
    """A CRD schema where objects with declared properties reject any other field (structural
    pruning + strict field validation in the API server), unless marked preserve-unknown-fields."""
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(crd_dir: Path, kind: str, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((crd_dir / CUSTOM_KINDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in served, f"{kind} {version} not in the CRD (has {sorted(served)})"
    return jsonschema.Draft7Validator(strict_schema(served[version]["schema"]["openAPIV3Schema"]))


def validate_manifest(doc: dict, crd_dir: Path) -> None:
    """Raise when `doc` does not validate: CRD schema for KubeRay kinds, Kubernetes' for the rest."""
    kind = doc["kind"]
    if kind in CUSTOM_KINDS:
        group, _, version = doc["apiVersion"].partition("/")
        assert group == "ray.io", doc["apiVersion"]
        errors = sorted(crd_validator(crd_dir, kind, version).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise jsonschema.ValidationError(
                "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        kubernetes_validate.validate(meta, K8S_VERSION, strict=True)  # the CRD leaves metadata open
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def crd_dir(shared_data) -> Path:
    return shared_data / "kuberay" / "crd"


@pytest.mark.parametrize("name,doc", manifests(), ids=[name for name, _ in manifests()])
def test_manifest_validates(name, doc, crd_dir):
    validate_manifest(doc, crd_dir)


def _docs_by_kind() -> dict[str, dict]:
    return {doc["kind"]: doc for _, doc in manifests() if doc["kind"] in ("RayCluster", "RayJob", "Deployment")}


@pytest.mark.parametrize("kind,path", [
    ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "containers", 0, "resourcez"]),
    ("RayCluster", ["spec", "workerGroupSpecs", 1, "maxReplica"]),
    ("RayCluster", ["spec", "autoscalerOptions", "idleTimeout"]),
    ("RayJob", ["spec", "entryPoint"]),
    ("Deployment", ["spec", "template", "spec", "containers", 0, "securityContex"]),
])
def test_unknown_field_is_rejected(kind, path, crd_dir):
    doc = copy.deepcopy(_docs_by_kind()[kind])
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = 1
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_manifest(doc, crd_dir)


def test_wrong_type_is_rejected(crd_dir):
    doc = copy.deepcopy(_docs_by_kind()["RayCluster"])
    doc["spec"]["workerGroupSpecs"][1]["minReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate_manifest(doc, crd_dir)


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
        pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
        return pods
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"]["spec"])]
    if doc["kind"] == "Deployment":
        return [(doc["metadata"]["name"], spec["template"]["spec"])]
    return []


def test_security_defaults():
    containers = []
    for name, doc in manifests():
        assert doc["kind"] != "Secret", f"{name}: credentials come from Secrets created outside the manifests"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert doc["spec"]["authOptions"]["mode"] == "token"
            containers.append((f"{name} autoscaler", doc["spec"]["autoscalerOptions"]))
        for pod, spec in _pod_specs(doc):
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), f"{name} {pod}"
            assert spec["securityContext"]["runAsNonRoot"] is True, f"{name} {pod}"
            assert not any("hostPath" in volume for volume in spec.get("volumes", [])), f"{name} {pod}"
            containers += [(f"{name} {pod} {c['name']}", c) for c in spec["containers"] + spec.get("initContainers", [])]
    assert len(containers) >= 6
    secret_like = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|CREDENTIALS?)(_|$)", re.I)
    for label, container in containers:
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{label}: {bound} for cpu and memory"
        security = container["securityContext"]
        assert security.get("privileged", False) is False, label
        assert security["allowPrivilegeEscalation"] is False, label
        assert security["capabilities"]["drop"] == ["ALL"], label
        for env in container.get("env", []):
            if secret_like.search(env["name"]):
                assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], f"{label}: {env['name']} inline"


def test_only_the_eval_workers_get_what_the_sandbox_fence_needs():
    """HumanEval's fence needs nested user namespaces, unshare and mount (seccomp, AppArmor) and a
    fresh /proc (procMount Unmasked); that group alone gets them, inside a pod user namespace, with the
    profiles shipped in cluster/kuberay/profiles, and it alone advertises the resource
    configs/cluster.yaml sends HumanEval's programs to."""
    relaxed = []
    for name, doc in manifests():
        for pod, spec in _pod_specs(doc):
            security = spec["securityContext"]
            containers = spec["containers"] + spec.get("initContainers", [])
            assert security.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), f"{name} {pod}"
            assert security.get("appArmorProfile", {}).get("type", "RuntimeDefault") in ("RuntimeDefault", "Localhost")
            if (security["seccompProfile"]["type"] == "Localhost" or "appArmorProfile" in security
                    or any(c["securityContext"].get("procMount") == "Unmasked" for c in containers)):
                relaxed.append(pod)
                assert spec.get("hostUsers") is False, f"{name} {pod}: relaxed only inside a pod user namespace"
                assert all(not c["securityContext"].get("capabilities", {}).get("add") for c in containers)
                assert spec["nodeSelector"] == {"raylm.io/sandbox-profiles": "installed"}
                profile = KUBERAY / "profiles" / Path(security["seccompProfile"]["localhostProfile"]).name
                denied = {n for rule in json.loads(profile.read_text())["syscalls"] for n in rule["names"]}
                assert not denied & {"unshare", "mount", "umount2", "mount_setattr", "landlock_create_ruleset",
                                     "landlock_add_rule", "landlock_restrict_self"}
                assert {"kexec_load", "init_module", "bpf", "ptrace", "open_by_handle_at"} <= denied
                apparmor = (KUBERAY / "profiles" / "raylm-sandbox.apparmor").read_text()
                assert f"profile {security['appArmorProfile']['localhostProfile']} " in apparmor
    assert relaxed == ["eval-workers"]
    resource = load_config(CONFIGS / "cluster.yaml").eval.sandbox_ray_resource
    groups = {g["groupName"]: g for g in _docs_by_kind()["RayCluster"]["spec"]["workerGroupSpecs"]}
    advertised = {name: g["rayStartParams"].get("resources", "") for name, g in groups.items()}
    assert [name for name, text in advertised.items() if resource and resource in text] == ["eval-workers"]


def test_gpu_workers_match_the_elastic_trainer_range():
    config = load_config(CONFIGS / "cluster.yaml")
    cluster = _docs_by_kind()["RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (config.train.min_workers, config.train.max_workers)
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert config.train.use_gpu is True
    for cloud in ("aws", "gcp"):
        launcher = yaml.safe_load((RAY_UP / f"{cloud}.yaml").read_text())
        node = launcher["available_node_types"]["gpu_worker"]
        assert (node["min_workers"], node["max_workers"]) == (config.train.min_workers, config.train.max_workers)


def test_every_pod_mounts_the_shared_workspace_and_reaches_mlflow():
    cluster = _docs_by_kind()["RayCluster"]
    claims = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    assert claims["raylm-workspace"]["spec"]["accessModes"] == ["ReadWriteMany"]
    services = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "Service"}
    for pod, spec in _pod_specs(cluster):
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "raylm-workspace", pod
        container = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAYLM_WORKSPACE"].startswith(mounts["workspace"] + "/"), pod
        host = env["MLFLOW_TRACKING_URI"].removeprefix("http://").split(":")[0]
        assert host in services, pod


def test_rayjob_runs_the_pipeline_entrypoint_with_the_job_runtime_env():
    job = _docs_by_kind()["RayJob"]
    cluster = _docs_by_kind()["RayCluster"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    command = job["spec"]["entrypoint"].split()
    assert command[0] == "python"
    image_root = "/home/ray/raylm/"
    assert command[1] == image_root + "jobs/pipeline.py"
    assert (REPO / command[1].removeprefix(image_root)).exists()
    config = command[command.index("--config") + 1]
    load_config(REPO / config.removeprefix(image_root))
    job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert job_env["env_vars"] == yaml.safe_load((JOBS / "runtime_env.yaml").read_text())["env_vars"]
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"WORKDIR {image_root.rstrip('/')}" in dockerfile
    assert f"rayproject/ray:{cluster['spec']['rayVersion']}-" in dockerfile


def test_kustomization_applies_everything_but_the_job_in_order():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert resources[0] == "namespace.yaml"
    assert resources.index("storage.yaml") < resources.index("raycluster.yaml")
    assert resources.index("mlflow.yaml") < resources.index("raycluster.yaml")
    on_disk = {p.name for p in KUBERAY.glob("*.yaml")} - {"kustomization.yaml", "rayjob.yaml"}
    assert set(resources) == on_disk
    assert kustomization["namespace"] == "raylm"
    script = (KUBERAY / "apply.sh").read_text()
    assert "kubectl apply -k" in script and "rayjob.yaml" in script


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ray_up_config_validates_against_rays_schema(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((RAY_UP / f"{cloud}.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == cloud
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_every_stage_has_a_thin_job_entrypoint():
    from raylm.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    for stage in STAGE_JOBS:
        source = (JOBS / job_file(stage)).read_text()
        assert f'main(["{stage}", *sys.argv[1:]])' in source, stage
    runtime_env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of the runtime_env fields
    present = [stage for stage in STAGE_JOBS if stage in commands]
    assert {"curate", "tokenize", "pretrain", "eval", "pipeline"} <= set(present)
    for stage in present:
        shown = subprocess.run([sys.executable, str(JOBS / job_file(stage)), "--help"],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"usage: raylm {stage}" in shown.stdout


def _policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"] for _, doc in manifests() if doc["kind"] == "NetworkPolicy"}


def _admits(spec: dict, labels: dict[str, str], port: int) -> bool:
    """Whether an Ingress policy admits a pod of the namespace with `labels` on `port`."""
    for rule in spec.get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" not in peer and wanted.items() <= labels.items():
                return True
    return False


def test_mlflow_asks_for_credentials_and_only_the_ray_pods_reach_it_or_the_head():
    import configparser

    mlflow_docs = {d["kind"]: d for _, d in manifests() if d["metadata"]["name"] in ("mlflow", "mlflow-auth")}
    container = mlflow_docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "mlflow server --app-name basic-auth" in container["args"][0]
    assert container["image"].split(":")[0] == "raylm"  # our image: the jobs' MLflow, with its auth extra
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_PASSWORD", "password"), ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "raylm-mlflow-auth", "key": key}
    ini = configparser.ConfigParser()
    ini.read_string(mlflow_docs["ConfigMap"]["data"]["basic_auth.ini"])
    admin = ini["mlflow"]["admin_username"]
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    mount = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rsplit("/", 1)[0]
    assert mount in {m["mountPath"] for m in container["volumeMounts"]}
    assert "raylm-mlflow-auth" in (KUBERAY / "apply.sh").read_text()

    for pod, spec in _pod_specs(_docs_by_kind()["RayCluster"]):
        ray_env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert ray_env["MLFLOW_TRACKING_USERNAME"]["value"] == admin, pod
        assert ray_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "raylm-mlflow-auth",
                                                                                    "key": "password"}, pod

    policies = _policies()
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    ray_pod = {"ray.io/cluster": "raylm", "ray.io/node-type": "worker"}
    head = {"ray.io/cluster": "raylm", "ray.io/node-type": "head"}
    submitter = _docs_by_kind()["RayJob"]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    stranger = {"app.kubernetes.io/name": "some-other-app"}
    mlflow_pod = mlflow_docs["Deployment"]["spec"]["template"]["metadata"]["labels"]

    def admitted(target: dict[str, str], source: dict[str, str], port: int) -> bool:
        return any(_admits(spec, source, port) for spec in policies.values()
                   if spec["podSelector"].get("matchLabels", {}).items() <= target.items())

    assert admitted(mlflow_pod, ray_pod, 5000) and admitted(mlflow_pod, head, 5000)
    assert not admitted(mlflow_pod, submitter, 5000) and not admitted(mlflow_pod, stranger, 5000)
    assert admitted(head, ray_pod, 6379) and admitted(head, submitter, 8265)
    assert not admitted(head, submitter, 6379) and not admitted(head, stranger, 8265)
    assert not admitted(ray_pod, submitter, 8265) and not admitted(ray_pod, stranger, 10001)
    operator = next(p for p in policies["ray-head-dashboard-for-jobs"]["ingress"][0]["from"] if "namespaceSelector" in p)
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ray_up_starts_mlflow_with_authentication_and_every_node_logs_in(cloud):
    launcher = yaml.safe_load((RAY_UP / f"{cloud}.yaml").read_text())
    head = " ".join(launcher["head_start_ray_commands"])
    assert "mlflow server --app-name basic-auth" in head
    assert "MLFLOW_AUTH_CONFIG_PATH=/home/ray/raylm/cluster/ray-up/mlflow_basic_auth.ini" in head
    assert (RAY_UP / "mlflow_basic_auth.ini").exists()
    password = "MLFLOW_TRACKING_PASSWORD=$(cat ~/.raylm-mlflow-password)"
    assert password in head and password in " ".join(launcher["worker_start_ray_commands"])
    assert launcher["file_mounts"]["/home/ray/.raylm-mlflow-password"] == "~/.raylm/mlflow-password"
