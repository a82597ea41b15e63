"""The deployment harness: configs round-trip to the subprocess, a server that fails to
start is reported with its output, a server that ignores SIGINT is killed anyway, and
every run gets prompts of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import (
    _stop,
    config_yaml,
    deployment,
    free_port,
    load_config,
)
from bench.loadgen import prompt_seed
from router.config import PoolConfig, RouterConfig, ServeConfig


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = ServeConfig(
        model="m",
        prefill=PoolConfig(num_instances=2, pp=2, pp_boundaries=(3,), policy="shortest_first"),
        router=RouterConfig(policy="round_robin", transfer_gbps=1.5),
    )
    path = tmp_path / "serve.yaml"
    path.write_text(config_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert load_config({"model": "m", "decode": {"max_num_seqs": 8}}).decode.max_num_seqs == 8
    assert load_config(cfg) is cfg
    with pytest.raises(ValueError, match="unknown key"):
        load_config({"modle": "m"})


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_prompt_seeds_differ_per_run_and_from_the_warm_up() -> None:
    seeds = {prompt_seed(0, run) for run in range(10)}
    assert len(seeds) == 10 and 1 not in seeds and 0 not in seeds  # warm-up: seed + 1


def test_a_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with (
        pytest.raises(RuntimeError, match="exited with") as err,
        deployment({"model": str(tmp_path / "missing")}, log_path=log, startup_timeout_s=120),
    ):
        pass
    assert "missing" in str(err.value)  # the server's own message comes along
    assert log.is_file()


def test_stop_kills_a_server_that_ignores_sigint() -> None:
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(0.5)  # let it install the handler
    t0 = time.monotonic()
    _stop(process, timeout_s=0.5)
    assert process.poll() is not None and time.monotonic() - t0 < 10
