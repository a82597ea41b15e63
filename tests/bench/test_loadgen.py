"""The load generator over real gRPC: against a fake PDServe servicer (fast: timing,
open loop, error statuses, the CLI) and against a real server on the tiny model (slow)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.loadgen import make_prompts, make_request, run_workload
from bench.loadgen_cli import main
from bench.metrics import SLO, RequestRecord
from bench.traces import SyntheticLengths
from bench.workload import RequestSpec, Workload, make_workload
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

PREFILL_S, TPOT_S = 0.01, 0.002
ABORT_LEN = 77  # the fake refuses requests of this many output tokens


class FakePDServe(pb_grpc.PDServeServicer):
    """First token after PREFILL_S, then one every TPOT_S; RESOURCE_EXHAUSTED for
    ``max_tokens == ABORT_LEN``."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        n = request.sampling.max_tokens
        if n == ABORT_LEN:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room")
        start = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + PREFILL_S + i * TPOT_S - time.perf_counter()))
            yield pb.GenerateResponse(
                request_id=request.request_id, delta=pb.TokenDelta(token_ids=[i])
            )
        timings = pb.PhaseTimings(
            queue_ms=1.0, prefill_ms=PREFILL_S * 1e3, decode_ms=n * TPOT_S * 1e3
        )
        final = pb.FinalResult(finish_reason="length", timings=timings)
        yield pb.GenerateResponse(request_id=request.request_id, final=final)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerInfo:
        pools = [pb.PoolInfo(role=r, num_instances=1, tp=1, pp=1) for r in ("prefill", "decode")]
        return pb.ServerInfo(
            model="fake", max_model_len=256, pools=pools, slo=pb.SLO(ttft_ms=250, tpot_ms=50)
        )


class FakeServer:
    """A FakePDServe on a free port, on its own event loop in a thread."""

    def __init__(self) -> None:
        self.servicer = FakePDServe()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server = self.call(self._start())
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        pb_grpc.add_PDServeServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


def workload(specs: list[tuple[float, int, int]]) -> Workload:
    requests = [RequestSpec(i, t, p, o) for i, (t, p, o) in enumerate(specs)]
    return Workload(requests, "hand", "poisson", 1.0, 1.0, 1.0, 0, 256, 0)


def assert_sane(r: RequestRecord, tol_s: float = 0.5) -> None:
    """Status ok, every token, times in order; sent soon after the scheduled arrival
    (a loose bound: the test machine is shared; the module docstring of bench.loadgen
    reports the measured precision)."""
    assert r.status == "ok", (r.status, r.error)
    assert len(r.token_times) == r.output_len and r.finish_reason == "length"
    assert r.sent_s is not None and r.first_token_s is not None and r.finish_s is not None
    assert r.arrival_s <= r.sent_s <= r.arrival_s + tol_s
    assert r.sent_s <= r.first_token_s == r.token_times[0]
    assert all(a <= b for a, b in zip(r.token_times, r.token_times[1:], strict=False))
    assert r.token_times[-1] <= r.finish_s


def test_prompts_are_seeded_ids_below_the_vocab() -> None:
    wl = workload([(0.0, 5, 1), (0.1, 300, 2)])
    prompts = make_prompts(wl, vocab_size=50, seed=3)
    assert [len(p) for p in prompts] == [5, 300]
    assert all(0 <= t < 50 for p in prompts for t in p)
    assert prompts == make_prompts(wl, 50, 3) and prompts != make_prompts(wl, 50, 4)
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        make_prompts(wl, 0)
    msg = make_request(wl.requests[1], prompts[1], "r1", SLO(0.2, 0.05))
    s = msg.sampling
    assert (s.max_tokens, s.ignore_eos, s.temperature, s.HasField("temperature")) == (
        2,
        True,
        0,
        True,
    )
    assert list(msg.token_ids.ids) == prompts[1] and msg.slo.ttft_ms == pytest.approx(200)


@pytest.mark.parametrize("client", ["aio", "threads"])
def test_records_every_token_in_order(fake: FakeServer, client: str) -> None:
    synth = SyntheticLengths("uniform", prompt_mean=16, output_mean=10)
    wl = make_workload("synthetic", 30, 100.0, 256, seed=1, synthetic=synth)
    records = run_workload(fake.address, wl, vocab_size=100, client=client, progress=False)
    assert [r.index for r in records] == list(range(30))
    for r, spec in zip(records, wl.requests, strict=True):
        assert (r.prompt_len, r.output_len, r.arrival_s) == (
            spec.prompt_len,
            spec.output_len,
            spec.arrival_s,
        )
        assert_sane(r)
        assert r.ttft_s is not None and r.ttft_s >= PREFILL_S
        assert r.timings["prefill_ms"] == pytest.approx(PREFILL_S * 1e3)


def test_open_loop_never_waits_for_earlier_requests(fake: FakeServer) -> None:
    # the first request streams for ~0.4 s; the others arrive meanwhile and go at once
    wl = workload([(0.0, 4, 200), (0.05, 4, 2), (0.1, 4, 2), (0.15, 4, 2)])
    first, *rest = run_workload(fake.address, wl, vocab_size=10, progress=False)
    assert first.finish_s is not None and first.finish_s > 0.35
    for r in rest:
        assert_sane(r)
        assert r.finish_s is not None and r.finish_s < first.finish_s


@pytest.mark.parametrize("client", ["aio", "threads"])
def test_failures_get_their_grpc_status(fake: FakeServer, client: str) -> None:
    wl = workload([(0.0, 4, ABORT_LEN), (0.0, 4, 400), (0.01, 4, 3)])
    refused, late, fine = run_workload(
        fake.address, wl, vocab_size=10, client=client, timeout_s=0.2, progress=False
    )
    assert (refused.status, refused.error, refused.token_times) == (
        "RESOURCE_EXHAUSTED",
        "no room",
        [],
    )
    assert late.status == "DEADLINE_EXCEEDED" and not late.ok and late.token_times
    assert_sane(fine)


def test_run_workload_rejects_bad_arguments(fake: FakeServer) -> None:
    wl = workload([(0.0, 4, 2)])
    with pytest.raises(ValueError, match="unknown client 'curl'"):
        run_workload(fake.address, wl, 10, client="curl")
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        run_workload(fake.address, wl, 10, timeout_s=0)


def test_cli_writes_json_and_pngs(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lg.json"
    argv = ["--address", fake.address, "--dataset", "synthetic", "--rate", "50,100"]
    argv += ["--num-requests", "12", "--vocab-size", "100", "--prompt-mean", "20"]
    argv += ["--output-mean", "5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["workers"] == 2 and report["slo"] == {"ttft_ms": 250.0, "tpot_ms": 50.0}
    assert [r["workload"]["rate"] for r in report["runs"]] == [50.0, 100.0]
    for run in report["runs"]:
        assert run["summary"]["num_ok"] == 12 and run["summary"]["attainment"] == 1.0
        assert len(run["records"]) == 12
        assert run["workload"]["max_model_len"] == 256  # the server's
    for suffix in ("slo-scale", "phases", "rate"):
        assert (tmp_path / f"lg-{suffix}.png").is_file()
    printed = capsys.readouterr().out
    assert "SLO attainment 100.0%" in printed and "tightest SLO scale" in printed


def test_cli_goodput_search(fake: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    argv = ["--address", fake.address, "--dataset", "synthetic", "--num-requests", "5"]
    argv += ["--vocab-size", "10", "--prompt-mean", "4", "--output-mean", "2", "--out", str(out)]
    argv += ["--goodput", "10,40", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["goodput"]["status"] == "at_hi" and report["goodput"]["per_worker"] == 20.0
    assert [r["workload"]["rate"] for r in report["runs"]] == [10.0, 40.0]


@pytest.mark.slow
def test_end_to_end_against_a_real_server(tiny_llama: Path, ray_cluster: None) -> None:
    from router.server import Server
    from tests.router.test_disaggregated import serve_config
    from tests.router.test_server import Running

    cfg = serve_config(tiny_llama, "1-1", "local", profile=True)
    running = Running(Server(cfg.with_overrides(**{"server.port": 0})))
    try:
        synth = SyntheticLengths("uniform", prompt_mean=24, output_mean=8)
        wl = make_workload("synthetic", 20, 4.0, 128, seed=2, synthetic=synth)
        records = run_workload(running.address, wl, vocab_size=512, progress=False)
    finally:
        running.stop()
    assert len(records) == 20
    for r in records:
        assert_sane(r)
        assert r.timings["ttft_ms"] > 0 and r.timings["prefill_ms"] > 0
        assert r.timings["transfer_bytes"] > 0 or r.output_len == 1
        assert r.finish_s is not None and r.ttft_s is not None
        # the client sees the first token after the server made it
        assert r.ttft_s >= r.timings["prefill_ms"] / 1e3
