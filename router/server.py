"""The gRPC frontend (grpc.aio): validates, routes through the controller and relays
each request's stream; plus the standard health service and server reflection.

A client that cancels or disconnects cancels its handler, which closes the
controller's stream and so aborts the request wherever it is (blocks freed on both
sides). ``serve`` runs until SIGINT/SIGTERM, then drains: health says NOT_SERVING,
new calls are refused, calls in flight get ``drain_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from decode.instance import DecodeInstance
from engine.core import RequestIdInUse
from engine.layout import kv_bytes_per_token
from prefill.instance import PrefillInstance
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from router import api
from router.config import ServeConfig
from router.controller import Controller, SLOUnattainable

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["PDServe"].full_name
MAX_MESSAGE_BYTES = 16 << 20  # a prompt of ~1M token ids; more is RESOURCE_EXHAUSTED


class PDServeServicer(pb_grpc.PDServeServicer):
    """The PDServe service on top of a started ``Controller``."""

    def __init__(self, controller: Controller, config: ServeConfig):
        self.controller = controller
        self.config = config
        self.max_model_len = min(d.max_model_len for d in controller.decode)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streams token deltas, then the final result. INVALID_ARGUMENT (naming the
        field) for bad input, ALREADY_EXISTS for a request id in use."""
        try:
            params = api.sampling_params(request.sampling, self.max_model_len)
            prompt = api.prompt(request)
            slo = api.slo(request, self.config)
        except api.InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream = self.controller.generate(prompt, params, request.request_id or None, slo)
        sent_tokens, sent_text = 0, 0
        try:
            async for update in stream:
                out = update.output
                rid = out.request_id
                delta = pb.TokenDelta(
                    token_ids=out.token_ids[sent_tokens:], text=out.text[sent_text:]
                )
                if out.logprobs:
                    delta.logprobs.extend(lp.logprob for lp in out.logprobs[sent_tokens:])
                sent_tokens, sent_text = len(out.token_ids), len(out.text)
                yield pb.GenerateResponse(request_id=rid, delta=delta)
                if update.finished:
                    yield pb.GenerateResponse(request_id=rid, final=api.final_result(update))
        except RequestIdInUse as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except SLOUnattainable as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:  # the prompt, checked against the model and the cache
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()  # aborts the request if it did not finish

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AbortResponse:
        """Stops a request in any phase; ``found`` false if unknown."""
        return pb.AbortResponse(found=self.controller.abort(request.request_id))

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerInfo:
        """Model, pools, layouts, SLOs, transport, policy, version."""
        return api.server_info(self.config, self.controller.model, self.max_model_len)

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadReport:
        """Per instance: queue, running, KV blocks free/used/total, leases, pending, KV
        geometry and transfers, and the router's fitted latency model."""
        stats = self.controller.stats()
        insts: list[PrefillInstance | DecodeInstance] = [*self.controller.prefill]
        insts += self.controller.decode
        for inst in insts:
            info = inst.executor.info
            stats[inst.instance_id] |= {
                "block_size": info.block_size,
                "kv_bytes_per_token": kv_bytes_per_token(inst.model_config, info.dtype, 1),
            }
        return api.load_report(stats, self.controller.router.models)


class Server:
    """A started controller behind a started gRPC server; ``port`` is the bound one."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.controller = Controller(config)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Connects to Ray, binds ``server.host:server.port`` (0: a free port, see
        ``self.port``), starts the pools, then serves. OSError naming the address,
        before any pool starts, when it cannot be bound (another server holds it)."""
        self.controller.connect()  # before grpcio starts its threads (see connect)
        try:
            server = self._bind()
        except BaseException:
            await self.controller.stop()
            raise
        try:
            await self.controller.start()
        except BaseException:
            await server.stop(None)
            raise
        # The controller's config: it settles kv.transport auto as it connects.
        servicer = PDServeServicer(self.controller, self.controller.config)
        pb_grpc.add_PDServeServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self.grpc = server
        await self.grpc.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _bind(self) -> grpc.aio.Server:
        """The gRPC server, bound (not started); OSError naming the address."""
        opts = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC shares a port between servers by default: a second `pdserve serve`
            # would silently take half of the first one's connections.
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=opts)
        address = f"{self.config.server.host}:{self.config.server.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpcio raises where older versions returned 0
            raise OSError(f"cannot listen on {address}: {e}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (in use?)")
        return server

    async def stop(self, drain_s: float = 5.0) -> None:
        """Drains (NOT_SERVING, no new calls, ``drain_s`` for those in flight), then
        stops the pools."""
        await self.health.enter_graceful_shutdown()
        if self.grpc is not None:
            await self.grpc.stop(drain_s)
            self.grpc = None
        await self.controller.stop()


async def serve(config: ServeConfig, drain_s: float = 5.0) -> None:
    """Runs a server until SIGINT or SIGTERM, then drains and stops cleanly."""
    server = Server(config)
    await server.start()
    print(
        f"pdserve: serving {server.controller.model} on {config.server.host}:{server.port}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        print("pdserve: draining ...", flush=True)
    finally:
        await server.stop(drain_s)
        print("pdserve: stopped", flush=True)
