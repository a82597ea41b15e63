"""Open-loop load generator: drives a running pdserve server over gRPC.

Run: ``python -m bench.loadgen --address HOST:PORT --dataset azure-conv --rate 2
--num-requests 200 --vocab-size V [--slo-ttft-ms 250 --slo-tpot-ms 100]``. Each request
of the workload (``bench.workload``) is sent at its arrival time whatever the earlier
ones are doing, as token ids of its prompt length (random, below ``--vocab-size``)
with ``max_tokens=output_len``, ``ignore_eos`` and greedy sampling. Every token's
arrival is timed on the client, with the server's final per-phase timings. Prints the
summary (``bench.metrics``); writes the JSON (summary, workload, every record) and PNGs
beside it: attainment vs SLO scale, the phase breakdown and, for several rates or a
goodput search, attainment vs rate.

Two clients: ``aio`` (default; one grpc.aio channel, one event loop, one task per
stream) and ``threads`` (one blocking stream per thread on one channel). Measured on
the 2-core development machine (busy with other work) against a fake server streaming
a token every 20 ms, 300 requests at 25 req/s (up to 67 concurrent streams): aio sent
each request p99 1.4–2.7 ms after its arrival time and saw each token p99 2–3 ms after
the server sent it; threads p99 8–10 ms and 36–48 ms (GIL hand-offs between 67
threads). Hence aio is the default. Near 170 streams (8,000 messages/s) client and
server saturate two cores: check ``send_lag_ms`` in the summary.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from bench.metrics import SLO, RequestRecord
from bench.workload import RequestSpec, Workload
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

CLIENTS = ("aio", "threads")
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def make_prompts(workload: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One prompt per request: ``prompt_len`` random token ids in ``[0, vocab_size)``,
    deterministic for a seed (and independent of the other requests)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return [
        np.random.default_rng([seed, r.index]).integers(0, vocab_size, r.prompt_len).tolist()
        for r in workload.requests
    ]


def make_request(
    spec: RequestSpec, prompt: Sequence[int], request_id: str, slo: SLO | None = None
) -> pb.GenerateRequest:
    """The Generate message: token-id prompt, exactly ``output_len`` greedy tokens
    (``ignore_eos``), and the request's SLO when ``slo`` is given."""
    msg = pb.GenerateRequest(
        request_id=request_id,
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True),
    )
    msg.token_ids.ids.extend(prompt)
    if slo is not None:
        msg.slo.ttft_ms = slo.ttft_s * 1e3
        msg.slo.tpot_ms = slo.tpot_s * 1e3
    return msg


_TIMING_FIELDS = pb.PhaseTimings.DESCRIPTOR.fields


class _Recorder:
    """Builds one request's record from its stream, timed from ``t0``."""

    def __init__(self, spec: RequestSpec, t0: float):
        self.t0 = t0
        self.record = RequestRecord(
            spec.index, spec.arrival_s, None, [], None, "UNKNOWN", spec.prompt_len, spec.output_len
        )

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sent(self) -> None:
        self.record.sent_s = self.now()

    def message(self, msg: pb.GenerateResponse) -> None:
        t = self.now()
        rec = self.record
        if msg.WhichOneof("kind") == "delta":
            rec.token_times.extend([t] * len(msg.delta.token_ids))
            if rec.first_token_s is None and rec.token_times:
                rec.first_token_s = t
        else:
            final = msg.final
            rec.finish_s = t
            rec.status = "ok"
            rec.finish_reason = final.finish_reason
            rec.timings = {f.name: float(getattr(final.timings, f.name)) for f in _TIMING_FIELDS}

    def failed(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self.record.status = code.name if code is not None else "UNKNOWN"
        self.record.error = details or ""
        self.record.finish_s = self.now()

    def ended(self) -> RequestRecord:
        if self.record.status == "UNKNOWN" and not self.record.error:
            self.record.error = "stream ended without a final message"
        return self.record


async def _run_aio(
    address: str,
    specs: Sequence[RequestSpec],
    messages: Sequence[pb.GenerateRequest],
    timeout_s: float | None,
    on_done: Callable[[], None],
) -> list[RequestRecord]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.PDServeStub(channel)
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, msg: pb.GenerateRequest) -> RequestRecord:
            rec = _Recorder(spec, t0)
            rec.sent()
            call = stub.Generate(msg, timeout=timeout_s)
            try:
                async for response in call:
                    rec.message(response)
            except grpc.aio.AioRpcError as e:
                rec.failed(e.code(), e.details())
            on_done()
            return rec.ended()

        tasks = []
        for spec, msg in zip(specs, messages, strict=True):
            delay = t0 + spec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, msg)))
        return list(await asyncio.gather(*tasks))


def _run_threads(
    address: str,
    specs: Sequence[RequestSpec],
    messages: Sequence[pb.GenerateRequest],
    timeout_s: float | None,
    on_done: Callable[[], None],
) -> list[RequestRecord]:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.PDServeStub(channel)
        records: list[RequestRecord | None] = [None] * len(specs)
        lock = threading.Lock()
        t0 = time.perf_counter()

        def one(i: int) -> None:
            rec = _Recorder(specs[i], t0)
            rec.sent()
            try:
                for response in stub.Generate(messages[i], timeout=timeout_s):
                    rec.message(response)
            except grpc.RpcError as e:
                rec.failed(getattr(e, "code", lambda: None)(), getattr(e, "details", str)())
            records[i] = rec.ended()
            with lock:
                on_done()

        threads = []
        for i, spec in enumerate(specs):
            delay = t0 + spec.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            threads.append(threading.Thread(target=one, args=(i,), daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join()
        return [r for r in records if r is not None]


def run_workload(
    address: str,
    workload: Workload,
    vocab_size: int,
    *,
    seed: int = 0,
    slo: SLO | None = None,
    client: str = "aio",
    timeout_s: float | None = 600.0,
    progress: bool = True,
) -> list[RequestRecord]:
    """Sends every request of ``workload`` to the server at ``address`` at its arrival
    time (open loop) and returns one record per request, in workload order. ``slo``:
    also send it with each request (otherwise the deployment's applies).
    ``timeout_s``: the deadline of each request (DEADLINE_EXCEEDED after it)."""
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; choose from {CLIENTS}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    specs = workload.requests
    if not specs:
        raise ValueError("the workload has no requests")
    tag = uuid.uuid4().hex[:8]
    prompts = make_prompts(workload, vocab_size, seed)
    messages = [
        make_request(s, p, f"loadgen-{tag}-{s.index}", slo)
        for s, p in zip(specs, prompts, strict=True)
    ]
    bar = tqdm(total=len(specs), desc=f"{workload.rate:g} req/s", unit="req", disable=not progress)
    try:
        if client == "aio":
            return asyncio.run(_run_aio(address, specs, messages, timeout_s, bar.update))
        return _run_threads(address, specs, messages, timeout_s, bar.update)
    finally:
        bar.close()


def prompt_seed(seed: int, run: int) -> int:
    """The prompt seed of run ``run`` (0, 1, …); distinct from every other run's and
    from the warm-up's (``warm_up`` uses ``seed + 1``)."""
    return seed + 1_000 * (run + 1)


def warm_up(address: str, workload: Workload, vocab_size: int, n: int, seed: int = 0) -> None:
    """Runs the first ``n`` requests of ``workload`` one after the other, unrecorded,
    so that the measured runs do not pay the server's first-call costs."""
    warm = workload.requests[:n]
    for spec in warm:
        one = replace(workload, requests=[replace(spec, arrival_s=0.0)])
        run_workload(address, one, vocab_size, seed=seed + 1, progress=False)


def server_workers(info: Any) -> int:
    """Workers of a deployment from its ``ServerInfo``: Σ instances · tp · pp."""
    return sum(p.num_instances * p.tp * p.pp for p in info.pools) or 1


if __name__ == "__main__":
    import sys

    from bench.loadgen_cli import main

    sys.exit(main())
