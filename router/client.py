"""A small Python client for a pdserve server (``pdserve client`` uses it).

with Client("127.0.0.1:50051") as c:
    print(c.generate("Hello", max_tokens=16).text)
    for delta in c.stream("Hello", max_tokens=16):
        print(delta.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc


@dataclass
class Delta:
    """New tokens and text of one streamed message."""

    token_ids: list[int]
    text: str


@dataclass
class GenerateResult:
    """A finished request: all tokens, text, finish reason and the server's report."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    prefill_instance: str = ""
    decode_instance: str = ""


def _fields(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


class Client:
    """A channel to one server. Methods raise ``grpc.RpcError`` with the server's
    status (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float | None = None):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.PDServeStub(self.channel)
        self.timeout_s = timeout_s

    def request(
        self,
        prompt: str | list[int],
        request_id: str = "",
        ttft_ms: float | None = None,
        tpot_ms: float | None = None,
        **sampling: Any,
    ) -> pb.GenerateRequest:
        """The request message; ``sampling`` are ``SamplingParams`` fields."""
        msg = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
        if isinstance(prompt, str):
            msg.text = prompt
        else:
            msg.token_ids.ids.extend(prompt)
        if ttft_ms is not None:
            msg.slo.ttft_ms = ttft_ms
        if tpot_ms is not None:
            msg.slo.tpot_ms = tpot_ms
        return msg

    def responses(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """The raw response stream; closing it early (``.cancel()``) aborts the request."""
        return iter(self.stub.Generate(request, timeout=self.timeout_s))

    def stream(self, prompt: str | list[int], **kwargs: Any) -> Iterator[Delta]:
        """Yields each delta as it arrives."""
        for msg in self.responses(self.request(prompt, **kwargs)):
            if msg.WhichOneof("kind") == "delta":
                yield Delta(list(msg.delta.token_ids), msg.delta.text)

    def generate(self, prompt: str | list[int], **kwargs: Any) -> GenerateResult:
        """Runs a request to the end."""
        result = GenerateResult("")
        for msg in self.responses(self.request(prompt, **kwargs)):
            result.request_id = msg.request_id
            if msg.WhichOneof("kind") == "delta":
                result.token_ids += list(msg.delta.token_ids)
                result.text += msg.delta.text
            else:
                final = msg.final
                result.finish_reason = final.finish_reason
                result.usage = _fields(final.usage)
                result.timings = _fields(final.timings)
                result.prefill_instance = final.prefill_instance
                result.decode_instance = final.decode_instance
        return result

    def abort(self, request_id: str) -> bool:
        """Stops a request; False if the server does not know it."""
        return bool(self.stub.Abort(pb.AbortRequest(request_id=request_id)).found)

    def server_info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout_s)

    def load(self) -> pb.LoadReport:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
