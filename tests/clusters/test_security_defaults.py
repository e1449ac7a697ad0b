"""Security defaults of every cluster definition and of the client: token auth on, services bound to
loopback (or kept inside the cluster network), the token read from the environment or a file and
never written into a definition."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from streamctx.cli import jobs
from streamctx.cli.auth import resolve_token

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
EXPOSED_SERVICE_TYPES = ("LoadBalancer", "NodePort")


def _definitions() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh"))


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec]
    return [spec.get("rayClusterSpec") or spec.get("rayClusterConfig")]


def test_every_definition_is_checked() -> None:
    # A new cluster definition must be one of the kinds below (and so pass their checks).
    kinds = {}
    for path in _definitions():
        rel = path.relative_to(CLUSTERS).as_posix()
        if path.suffix == ".sh":
            kinds[rel] = "script"
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if any(d.get("kind") in KUBERAY_KINDS for d in docs):
            kinds[rel] = "kuberay"
        elif all("head_start_ray_commands" in d for d in docs):
            kinds[rel] = "launcher"
        else:
            kinds[rel] = "unknown"
    assert "unknown" not in kinds.values(), kinds
    assert {"kuberay", "launcher", "script"} <= set(kinds.values())


@pytest.mark.parametrize("path", [p for p in _definitions() if p.suffix != ".sh"],
                         ids=lambda p: p.relative_to(CLUSTERS).as_posix())
def test_yaml_definitions_keep_token_auth_and_private_services(path: Path) -> None:
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        for node in _walk(doc):  # never switched off, never a literal token
            if isinstance(node, dict) and node.get("name") in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                assert node.get("value") in ("token", None), node
                assert "valueFrom" in node or node["name"] == "RAY_AUTH_MODE", f"literal token in {path.name}"
            if isinstance(node, dict) and "serviceType" in node:
                assert node["serviceType"] not in EXPOSED_SERVICE_TYPES, node["serviceType"]
            if isinstance(node, str):
                assert "RAY_AUTH_MODE=disabled" not in node and not re.search(r"auth_token\s*[:=]\s*\w{16,}", node)
        if doc.get("kind") in KUBERAY_KINDS:
            for spec in _ray_cluster_specs(doc):
                assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
                # Inside the pod the dashboard must listen on the pod IP for the ClusterIP Service;
                # no group may publish a host port.
                for container in (c for n in _walk(spec) if isinstance(n, dict) for c in n.get("containers", [])):
                    assert all("hostPort" not in p for p in container.get("ports", [])), container["name"]
        elif doc.get("kind") is None:  # cluster launcher
            head = " ".join(doc["head_start_ray_commands"])
            workers = " ".join(doc["worker_start_ray_commands"])
            assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
            assert re.search(r"--dashboard-host[= ]127\.0\.0\.1", head)
            assert "0.0.0.0" not in head + workers


def test_local_script_is_loopback_with_token_auth() -> None:
    text = (CLUSTERS / "local" / "start.sh").read_text()
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text and "HOST=127.0.0.1" in text
    assert "0.0.0.0" not in text
    # Every `ray start` binds the node and the dashboard to $HOST.
    starts = [c for c in re.split(r"\n(?=\s*\"\$RAY_BIN\" start)", text) if '"$RAY_BIN" start' in c]
    assert len(starts) == 2
    for cmd in starts:
        assert '--node-ip-address "$HOST"' in cmd
    assert '--dashboard-host "$HOST"' in starts[0]


def test_submit_reads_the_token_from_env_or_file_and_sends_it(tmp_path: Path, monkeypatch) -> None:
    seen: dict[str, Any] = {}

    class FakeClient:
        def __init__(self, address: str, headers: dict[str, str] | None = None) -> None:
            seen.update(address=address, headers=headers)

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    jobs.connect("http://127.0.0.1:8265", None)
    assert seen["headers"] == {"Authorization": "Bearer env-token"}
    (tmp_path / "tok").write_text("file-token\n")
    jobs.connect("http://127.0.0.1:8265", str(tmp_path / "tok"))
    assert seen["headers"] == {"Authorization": "Bearer file-token"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert resolve_token(None) == "file-token"


def test_token_never_appears_in_cli_arguments() -> None:
    # The token comes from the environment or a file: there is no flag that would put it in `ps`
    # output or shell history.
    from streamctx.cli.parser import build_parser

    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for sub in (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"):
        for p in sub.choices.values():
            flags |= {s for a in p._actions for s in a.option_strings}
    assert "--token-file" in flags and not any(f in flags for f in ("--token", "--auth-token", "--password"))


def test_documented_commands_use_loopback() -> None:
    text = (CLUSTERS / "README.md").read_text()
    for line in text.splitlines():
        if "port-forward" in line and "kubectl" in line:
            assert "--address 127.0.0.1" in line or "--address=127.0.0.1" in line, line
    for line in text.splitlines():
        if "streamctx submit" in line and "--address" in line:
            args = shlex.split(line.strip().strip("`").split("streamctx submit", 1)[1], comments=True)
            addr = args[args.index("--address") + 1] if "--address" in args else ""
            assert addr.startswith(("http://127.0.0.1", "http://localhost", "http://HEAD", "$")), line


def test_embedded_local_ray_serves_no_dashboard() -> None:
    """The embedded local Ray starts without a dashboard (no HTTP service at all). Its core services
    bind the node's address: Ray maps a loopback `_node_ip_address` back to the node IP
    (`ray._private.services.resolve_ip_for_localhost`), so loopback-only is not a Ray option; token
    auth (Ray's default) guards them."""
    tree = ast.parse((ROOT / "streamctx" / "dataflow" / "executors.py").read_text())
    inits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "ray.init"]
    assert inits
    for call in inits:
        kws = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kws.get("include_dashboard") == "False"
        assert "RAY_AUTH_MODE" not in ast.unparse(call)  # never switches token auth off
