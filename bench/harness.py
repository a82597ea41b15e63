"""Runs a deployment under load: the piece shared by ``bench.validate`` and
``pdserve bench compare``.

``deployment(config)`` starts ``pdserve serve --config F --port P`` in a subprocess on
127.0.0.1 (a free port), waits until its health service says SERVING, and on leaving
the ``with`` block (normally, on an error or on KeyboardInterrupt) stops it with
SIGINT (it drains and shuts its Ray instance down), escalating to SIGKILL of its
process group if it does not exit in time. ``run_rates`` warms the server up, then
sends one open-loop workload per rate (``bench.loadgen.run_workload``) and keeps each
run's records, summary and the load report fetched right after it (the router's
fitted latency models, KV geometry and transfer counters).

Every run sends prompts made with its own seed (``prompt_seed``), so no run finds
another's prompts in a prefix cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadgen import prompt_seed, run_workload, warm_up
from bench.metrics import SLO, RequestRecord, summarize
from bench.workload import Workload
from protos import pdserve_pb2 as pb
from router.client import Client
from router.config import ServeConfig

ConfigSource = ServeConfig | Mapping[str, Any] | str | Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load_config(source: ConfigSource) -> ServeConfig:
    """A ``ServeConfig`` from itself, plain data (parsed YAML) or a YAML file;
    ValueError naming a bad key or value."""
    if isinstance(source, ServeConfig):
        return source
    if isinstance(source, str | Path):
        return ServeConfig.from_yaml(source)
    return ServeConfig.from_dict(dict(source))


def config_yaml(config: ServeConfig) -> str:
    """``config`` as YAML that ``ServeConfig.from_yaml`` reads back equal."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)


@dataclass
class Deployment:
    """A running ``pdserve serve`` subprocess: its gRPC ``address`` and its log."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def server_info(self, timeout_s: float = 30.0) -> pb.ServerInfo:
        """``GetServerInfo``."""
        with Client(self.address, timeout_s) as client:
            return client.server_info()

    def load(self, timeout_s: float = 30.0) -> pb.LoadReport:
        """``GetLoad``: per instance load, KV geometry, transfers, latency models."""
        with Client(self.address, timeout_s) as client:
            return client.load()


def _wait_healthy(dep: Deployment, timeout_s: float) -> None:
    """Returns once the health service says SERVING; RuntimeError (with the server's
    last output) if the process exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(dep.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if dep.process.poll() is not None:
                raise RuntimeError(
                    f"pdserve serve exited with {dep.process.returncode} while starting:\n"
                    + dep.log_tail()
                )
            with contextlib.suppress(grpc.RpcError):
                status = stub.Check(request, timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.5)
    raise RuntimeError(f"pdserve serve not healthy after {timeout_s:g} s:\n" + dep.log_tail())


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGINT (it drains and shuts its Ray instance down); SIGKILL of its process
    group if it is not gone within ``timeout_s``, or if the wait is interrupted."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except BaseException as e:  # too slow, or a second Ctrl-C: never leave it running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own group: start_new_session
        process.wait(10)
        if not isinstance(e, subprocess.TimeoutExpired):
            raise


@contextlib.contextmanager
def deployment(
    config: ConfigSource,
    *,
    startup_timeout_s: float = 600.0,
    stop_timeout_s: float = 60.0,
    log_path: Path | None = None,
) -> Iterator[Deployment]:
    """A ``pdserve serve`` subprocess of ``config`` on a free port of 127.0.0.1, healthy
    when the block starts and stopped when it ends, whatever the way out. The server's
    output goes to ``log_path`` (default: a temporary file)."""
    cfg = load_config(config)
    port = free_port()
    cfg = cfg.with_overrides(**{"server.host": "127.0.0.1", "server.port": port})
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(config_yaml(cfg))
        log = log_path or Path(tmp) / "serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "router.cli", "serve", "--config", str(path)]
        with log.open("wb") as out:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        dep = Deployment(f"127.0.0.1:{port}", process, log)
        try:
            _wait_healthy(dep, startup_timeout_s)
            yield dep
        finally:
            _stop(process, stop_timeout_s)


@dataclass
class RunResult:
    """One workload run: its records, summary and the load reports right before and
    right after it (their difference is the run's: steps, transfers)."""

    workload: Workload
    records: list[RequestRecord]
    summary: dict[str, Any]
    load_before: pb.LoadReport
    load: pb.LoadReport

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: workload metadata, summary, load report and every record."""
        return {
            "workload": self.workload.metadata(),
            "summary": self.summary,
            "load_before": MessageToDict(self.load_before, preserving_proto_field_name=True),
            "load": MessageToDict(self.load, preserving_proto_field_name=True),
            "records": [r.to_json() for r in self.records],
        }


def run_rates(
    dep: Deployment,
    rates: Sequence[float],
    make: Callable[[float], Workload],
    vocab_size: int,
    slo: SLO,
    *,
    warmup: int = 4,
    seed: int = 0,
    progress: bool = True,
    on_run: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Warms the server up with ``warmup`` requests one at a time, then runs
    ``make(rate)`` at each rate in turn (open loop, prompts of ``prompt_seed``);
    ``on_run`` sees each result as it comes."""
    if warmup > 0:
        warm_up(dep.address, make(rates[0] if rates else 1.0), vocab_size, warmup, seed)
    results = []
    for i, rate in enumerate(rates):
        workload = make(rate)
        before = dep.load()
        records = run_workload(
            dep.address, workload, vocab_size, seed=prompt_seed(seed, i), progress=progress
        )
        result = RunResult(workload, records, summarize(records, slo), before, dep.load())
        if on_run is not None:
            on_run(result)
        results.append(result)
    return results
