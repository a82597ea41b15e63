"""``ray job submit ... -- python -m router.cli serve --config FILE`` against a real
``ray start --head`` cluster on 127.0.0.1: the job joins the cluster (no Ray of its
own), serves gRPC, answers a real client, and drains on ``ray job stop``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.worker import free_port
from router.client import Client
from tests.router.test_disaggregated import reference

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 enables token auth after a first local start
    env.pop("RAY_ADDRESS", None)
    return env


def temp_dir() -> Path:
    """Under the project's run folder, unless that path is too long for Ray's sockets."""
    path = (ROOT / "run" / f"rj{os.getpid()}").resolve()
    if len(str(path)) > 45:
        return Path(tempfile.mkdtemp(prefix="pdrj-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def head() -> Iterator[str]:
    """A `ray start --head --block` cluster; its dashboard (job server) address."""
    gcs, dash, tmp = free_port(), free_port(), temp_dir()
    cmd = ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}"]
    cmd += ["--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=4"]
    cmd += [f"--temp-dir={tmp}", "--include-dashboard=true", "--disable-usage-stats"]
    # Ports Ray would otherwise take at fixed defaults, which another Ray on this
    # machine (the test session's own cluster) already holds: the job agent's above all.
    for flag in (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "ray-client-server-port",
    ):
        cmd.append(f"--{flag}={free_port()}")
    proc = subprocess.Popen(cmd, env=ray_env(), cwd=ROOT)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for(lambda: ray_cli("job", "list", "--address", address).returncode == 0, 90)
        yield address
    finally:
        proc.terminate()  # --block: ray start stops every process it started
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


def agent_logs() -> str:
    """The tail of the head's dashboard-agent logs (why no agent took the job)."""
    logs = sorted((ROOT / "run").glob(f"rj{os.getpid()}/session_latest/logs/dashboard_agent*"))
    return "".join(f"\n--- {p}\n" + p.read_text(errors="replace")[-3000:] for p in logs)


def ray_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ray", *args], env=ray_env(), cwd=ROOT, capture_output=True, text=True)


def wait_for(cond: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s}s")
        time.sleep(1.0)


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            req = health_pb2.HealthCheckRequest(service="pdserve.v1.PDServe")
            status = health_pb2_grpc.HealthStub(ch).Check(req, timeout=2).status
        except grpc.RpcError:
            return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def test_ray_job_submit_serves(head: str, tiny_llama: Path, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"ray_address: auto\nmodel: {tiny_llama}\ndtype: float32\n"
        "prefill: {num_blocks: 48, num_cpus_per_worker: 0.25}\n"
        "decode: {num_blocks: 48, num_cpus_per_worker: 0.25}\n"
        f"kv: {{transport: grpc}}\nserver: {{port: {port}}}\n"
    )
    # The dashboard answers before its job agent is up ("No available agent"): retry.
    args = ["job", "submit", "--address", head, "--working-dir", ".", "--no-wait", "--"]
    args += ["python", "-m", "router.cli", "serve", "--config", str(config)]
    deadline = time.monotonic() + 240  # slow to come up on a loaded 2-core machine
    submit = ray_cli(*args)
    while submit.returncode and "No available agent" in submit.stderr:
        if time.monotonic() > deadline:
            break
        time.sleep(2.0)
        submit = ray_cli(*args)
    assert submit.returncode == 0, submit.stderr + agent_logs()
    job = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr)
    assert job is not None, submit.stdout
    try:
        wait_for(lambda: serving(f"127.0.0.1:{port}"), 180)
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
            prompt = list(range(10, 60))
            result = client.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
            assert result.token_ids == reference(tiny_llama, [prompt])[0]
            assert [p.role for p in client.server_info().pools] == ["prefill", "decode"]
    finally:
        ray_cli("job", "stop", "--address", head, job.group(0))
    logs = ray_cli("job", "logs", "--address", head, job.group(0)).stdout
    assert "Connecting to existing Ray cluster" in logs  # joined, did not start its own
    assert "pdserve: draining" in logs and "pdserve: stopped" in logs
