"""A real gRPC client (the generated stubs) against a real server on 127.0.0.1:
streaming, aborts in each phase, bad input with precise status codes, health,
reflection, info and load."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.client import Client
from router.server import Server
from tests.router.test_disaggregated import reference, serve_config

PROMPT = list(range(10, 60))


class Running:
    """A server on a free port, run by its own event loop in a thread."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(server.start())
        self.address = f"127.0.0.1:{server.port}"

    def call(self, coro: object, timeout_s: float = 120.0) -> object:
        fut: Future[object] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout_s)

    def stop(self) -> None:
        self.call(self.server.stop(drain_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_llama: Path, ray_cluster: None) -> Iterator[Running]:
    cfg = serve_config(tiny_llama, "1-1", "auto", profile=True)  # local: one node
    cfg = cfg.with_overrides(**{"server.port": 0})
    running = Running(Server(cfg))
    yield running
    running.stop()


@pytest.fixture
def client(server: Running) -> Iterator[Client]:
    with Client(server.address, timeout_s=60) as c:
        yield c


def wait_clean(client: Client, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        load = client.load().instances
        held = [i for i in load if i.blocks_used or i.leased or i.pending or i.running or i.waiting]
        if not held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held: {load}")
        time.sleep(0.02)


def test_a_busy_port_is_refused_before_any_pool_starts(server: Running) -> None:
    """A second server on the first one's port fails at once, naming the address,
    without starting pools (gRPC would otherwise share the port between them)."""
    port = server.server.port
    second = Server(server.server.config.with_overrides(**{"server.port": port}))
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
        asyncio.run(second.start())
    assert second.grpc is None and not second.controller.stats()
    with Client(server.address, timeout_s=30) as c:  # the first one still serves
        assert c.server_info().pools


def test_streaming_equals_single_instance(client: Client, tiny_llama: Path) -> None:
    deltas = list(client.stream(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True))
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == reference(tiny_llama, [PROMPT])[0]
    assert len(deltas) == 12  # one message per decode step
    result = client.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert result.token_ids == tokens and result.finish_reason == "length"
    assert result.usage == {"prompt_tokens": 50, "completion_tokens": 12, "cached_tokens": 48}
    t = result.timings
    assert t["ttft_ms"] > 0 and t["mean_tpot_ms"] > 0 and t["transfer_bytes"] > 0
    assert t["ttft_ms"] >= t["prefill_ms"]
    assert (result.prefill_instance, result.decode_instance) == ("prefill-0", "decode-0")
    wait_clean(client)


def test_text_prompt_deltas_add_up(client: Client) -> None:
    deltas = list(client.stream("Hello there", max_tokens=10, temperature=0.0))
    result = client.generate("Hello there", max_tokens=10, temperature=0.0)
    assert "".join(d.text for d in deltas) == result.text


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"prompt": ""}, "INVALID_ARGUMENT", "prompt text is empty"),
        ({"prompt": []}, "INVALID_ARGUMENT", "prompt token_ids is empty"),
        ({"max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens"),
        ({"max_tokens": 10**6}, "INVALID_ARGUMENT", "max_tokens"),
        ({"temperature": -1.0}, "INVALID_ARGUMENT", "temperature"),
        ({"top_p": 0.0}, "INVALID_ARGUMENT", "top_p"),
        ({"top_p": 1.5}, "INVALID_ARGUMENT", "top_p"),
        ({"prompt": [1, 2, 10**6]}, "INVALID_ARGUMENT", "outside the vocabulary"),
        ({"prompt": list(range(1, 500)) * 2}, "INVALID_ARGUMENT", "max_model_len"),
        ({"prompt": "a" * (17 << 20)}, "RESOURCE_EXHAUSTED", ""),
    ],
)
def test_bad_input_gets_precise_status_and_harms_no_one(
    server: Running,
    client: Client,
    tiny_llama: Path,
    kwargs: dict[str, object],
    code: str,
    field: str,
) -> None:
    with Client(server.address, timeout_s=60) as other:
        good = threading.Thread(
            target=lambda: results.append(
                other.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
            )
        )
        results: list[object] = []
        good.start()
        prompt = kwargs.pop("prompt", [5, 6, 7])
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt, **{"max_tokens": 4, **kwargs})  # type: ignore[arg-type]
        good.join(60)
    assert err.value.code().name == code
    assert field in (err.value.details() or "")
    assert results and results[0].token_ids == reference(tiny_llama, [PROMPT])[0]  # type: ignore[attr-defined]
    wait_clean(client)


def test_duplicate_request_id(client: Client) -> None:
    long = client.responses(client.request(PROMPT, "dup", max_tokens=300, ignore_eos=True))
    next(long)  # it is running
    with pytest.raises(grpc.RpcError) as err:
        client.generate([5, 6], request_id="dup", max_tokens=2)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in (
        err.value.details() or ""
    )
    assert client.abort("dup")
    last = list(long)[-1]
    assert last.final.finish_reason == "abort"
    assert not client.abort("dup")
    wait_clean(client)


@pytest.mark.parametrize("after", [0, 1, 5])
def test_cancel_frees_blocks_in_each_phase(client: Client, after: int) -> None:
    """after=0: cancelled before the first token (queued/prefilling); 1: after the
    first token (under lease / transferring); 5: while decoding."""
    stream = client.responses(client.request(PROMPT, max_tokens=400, ignore_eos=True))
    for _ in range(after):
        next(stream)
    stream.cancel()  # type: ignore[attr-defined]
    wait_clean(client)


def test_health_reflection_info_load(server: Running, client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "pdserve.v1.PDServe"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(iter(refl.ServerReflectionInfo(iter([req]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health"} <= names
    info = client.server_info()
    assert [(p.role, p.tp, p.pp) for p in info.pools] == [("prefill", 1, 1), ("decode", 1, 1)]
    assert info.transport == "local" and info.max_model_len > 0 and info.version
    load = client.load()
    assert sorted(i.instance_id for i in load.instances) == ["decode-0", "prefill-0"]
    assert all(i.blocks_total == 48 for i in load.instances)


def test_load_report_carries_each_instance_latency_model() -> None:
    from router import api
    from router.latency_model import LatencyModel
    from router.step_fit import Coefficients

    model = LatencyModel(Coefficients(0.01, 2e-4, 1e-9), Coefficients(0.02, 3e-6, 4e-4))
    base = {"waiting": 0, "running": 1, "blocks_free": 3, "blocks_used": 1, "blocks_total": 4}
    stats = {
        "prefill-0": {**base, "leased": 2, "block_size": 16, "kv_bytes_per_token": 512},
        "decode-0": {
            **base,
            "kv_transfers": 3,
            "kv_transfer_bytes": 900,
            "kv_transfer_seconds": 0.5,
        },
    }
    report = api.load_report(stats, {"prefill-0": model})
    p, d = report.instances
    assert (p.role, p.leased, p.block_size, p.kv_bytes_per_token) == ("prefill", 2, 16, 512)
    assert (p.prefill_model.a, p.prefill_model.b, p.prefill_model.c) == (0.01, 2e-4, 1e-9)
    assert (p.decode_model.a, p.decode_model.b, p.decode_model.c) == (0.02, 3e-6, 4e-4)
    assert p.prefill_model.num_samples == 0 and not p.prefill_model.HasField("relative_error")
    assert (d.kv_transfers, d.kv_transfer_bytes, d.kv_transfer_seconds) == (3, 900, 0.5)
    assert not d.HasField("prefill_model")  # no model known for it


def test_load_reports_fitted_models_and_kv_geometry(client: Client, tiny_llama: Path) -> None:
    from engine.layout import kv_bytes_per_token
    from engine.model_config import ModelConfig

    client.generate(PROMPT[::-1], max_tokens=6, temperature=0.0, ignore_eos=True)
    load = {i.role: i for i in client.load().instances}
    per_token = kv_bytes_per_token(ModelConfig.from_pretrained(str(tiny_llama)), "float32", 1)
    for inst in load.values():
        assert inst.block_size == 16 and inst.kv_bytes_per_token == per_token
        fitted = inst.prefill_model if inst.role == "prefill" else inst.decode_model
        assert fitted.num_samples > 0 and fitted.window_samples > 0  # profiled at start
        assert fitted.a + fitted.b + fitted.c > 0 and fitted.HasField("relative_error")
    decode = load["decode"]
    assert decode.kv_transfers > 0 and decode.kv_transfer_bytes > 0
    assert decode.kv_transfer_seconds > 0
