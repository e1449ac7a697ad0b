"""A throwaway multi-node Ray cluster on loopback for end-to-end tests, token auth on.

Started with `ray start --block` (one process per node, each in its own session) and stopped by
signalling exactly those processes, then any straggler whose command line names this cluster's
private temp dir: never `ray stop`, which would kill every Ray on the machine, other test
sessions included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    # Every node on one host needs its own agent ports; Ray's defaults are fixed numbers.
    return [
        "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
    ]  # fmt: skip


@dataclass
class LoopbackCluster:
    temp_dir: Path
    token: str
    env: dict[str, str]
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], log: str) -> None:
        out = open(self.temp_dir / log, "w")  # noqa: SIM115 - lives as long as the process
        self.procs.append(
            subprocess.Popen([RAY, "start", "--block", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        )  # fmt: skip

    def start(self, workers: dict[str, float], timeout_s: float = 90.0) -> None:
        """A head (no CPUs: it hosts the driver only) and one worker node per entry of `workers`
        (name -> CPUs; each advertises a custom resource of its name)."""
        common = ["--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        self._start(
            ["--head", "--port", str(self.gcs_port), "--num-cpus", "1", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--ray-client-server-port", str(_free_port()), *common, *_agent_ports()],
            "head.log",
        )  # fmt: skip
        self._wait_for_dashboard(timeout_s)
        for name, cpus in workers.items():
            self._start(
                ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(cpus),
                 "--resources", json.dumps({name: 1}), *common, *_agent_ports()],
                f"{name}.log",
            )  # fmt: skip

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        request = urllib.request.Request(
            f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"}
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.temp_dir / 'head.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard not up after {timeout_s} s")

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers first, head last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in _pids_mentioning(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def loopback_cluster() -> LoopbackCluster:
    # Short temp dir: Ray's Unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="scx-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # The job's `python -m streamctx` must be this interpreter.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return LoopbackCluster(temp_dir=temp_dir, token=token, env=env)
