"""What the controller streams back per request, and the lifecycle timestamps
(DESIGN.md: arrived, routed, prefill_start, first_token, transfer_start,
transfer_end, decode_start, finished) it stamps on the way. A request prefilled on its
decode instance (colocated, or local prefill) has an empty transfer at its first
token: transfer_start = transfer_end = decode_start = first_token."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from decode.instance import DecodeInstance, TransferRecord
from engine.core import RequestOutput
from prefill.instance import PrefillInstance


@dataclass
class ClusterOutput:
    """One streamed update of a request: its output so far, who serves it, the KV
    transfer (once done) and the lifecycle timestamps (monotonic seconds)."""

    output: RequestOutput
    prefill_instance: str
    decode_instance: str
    timings: dict[str, float]
    transfer: TransferRecord | None = None

    @property
    def finished(self) -> bool:
        return self.output.finished


@dataclass
class RequestStream:
    """One request in flight: the pair serving it and the queue its caller reads."""

    prefill: PrefillInstance | None  # None: prefilled on the decode instance itself
    decode: DecodeInstance
    queue: asyncio.Queue[ClusterOutput | BaseException] = field(default_factory=asyncio.Queue)
    timings: dict[str, float] = field(default_factory=dict)
    transfer: TransferRecord | None = None
    last: RequestOutput | None = None
    prompt_len: int = 0
    awaiting_decode: bool = False  # routed to ``decode``, not handed over yet

    def __post_init__(self) -> None:
        self.timings["arrived"] = self.timings["routed"] = time.monotonic()

    @property
    def prefill_id(self) -> str:
        """The instance that computed the prompt."""
        return self.decode.instance_id if self.prefill is None else self.prefill.instance_id

    def on_transfer(self, record: TransferRecord) -> None:
        """Stamps the KV transfer; decoding starts as soon as it is admitted."""
        self.transfer = record
        self.timings.update(
            transfer_start=record.start, transfer_end=record.end, decode_start=record.end
        )

    def publish(self, out: RequestOutput, phase: str) -> None:
        """Stamps what ``out`` tells and queues it for the caller."""
        t = self.timings
        if phase == "prefill" and out.first_scheduled_time is not None:
            t.setdefault("prefill_start", out.first_scheduled_time)
        if out.first_token_time is not None and "first_token" not in t:
            t["first_token"] = out.first_token_time
            if self.prefill is None:  # prefilled here (colocated, or local prefill):
                if out.first_scheduled_time is not None:  # an empty transfer, then decoding
                    t.setdefault("prefill_start", out.first_scheduled_time)
                now = out.first_token_time
                t.update(transfer_start=now, transfer_end=now, decode_start=now)
        if out.finished and out.finish_time is not None:
            t["finished"] = out.finish_time
        self.last = out
        self.queue.put_nowait(
            ClusterOutput(out, self.prefill_id, self.decode.instance_id, dict(t), self.transfer)
        )

    def publish_abort(self, request_id: str) -> None:
        """Ends the stream with ``finish_reason`` "abort" (an Abort call from elsewhere)."""
        now = time.monotonic()
        last = self.last
        out = RequestOutput(
            request_id=request_id,
            prompt_token_ids=last.prompt_token_ids if last else [],
            token_ids=last.token_ids if last else [],
            text=last.text if last else "",
            finished=True,
            finish_reason="abort",
            num_cached_tokens=last.num_cached_tokens if last else 0,
            arrival_time=last.arrival_time if last else self.timings["arrived"],
            first_token_time=last.first_token_time if last else None,
            finish_time=now,
        )
        self.publish(out, "abort")
