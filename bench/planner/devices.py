"""Accelerators the planner sizes deployments for: published figures plus a calibration.

A ``Device`` holds what the vendor publishes (dense bf16 compute, memory bandwidth and
size, NVLink and the node's size) and the link between nodes, which is a property of
the cluster, not the chip (DistServe's low node-affinity cluster had 25 Gb/s between
nodes; a modern one 400 Gb/s InfiniBand per GPU). How much of the published figures a
real step achieves is a separate ``Calibration`` so that figures measured later (for
our engine, on the target device) replace the defaults without touching the table:
``device.calibrated(compute_efficiency=0.6)`` or ``pdserve plan --calibration FILE``.

``cpu`` is this machine: it has no roofline entry. Its step times come from measuring
the real engine (``bench/planner/cpu_profile.py``); its memory figure is the host's RAM
(every worker shares it, so it never binds for the small models run on CPU).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from router.bandwidth import DEFAULT_BANDWIDTH_BYTES_S

GB = 1e9  # vendors publish decimal gigabytes

# --- Calibration defaults, and where they come from.
# Measured on an H200 of this workplace: a bf16 8192³ matmul ran at 788 TFLOP/s,
# 0.80 of the 989 TFLOP/s published; a device-to-device copy at 4.3 TB/s, 0.90 of the
# 4.8 TB/s published. Applied to H100 and A100 too until measured there (the same
# cuBLAS GEMMs and HBM copies reach similar fractions on Hopper and Ampere).
MEASURED_H200 = "H200 of this workplace: bf16 8192^3 matmul 788 TFLOP/s, device copy 4.3 TB/s"
COMPUTE_EFFICIENCY = 0.80
BANDWIDTH_EFFICIENCY = 0.90
# Not measured yet (assumptions, to calibrate against our engine): a step's fixed cost
# (scheduling, kernel launches, sampling) of a few ms as vLLM-class engines show on
# 70B models; an NCCL all-reduce of a small message inside an NVLink node ~15 µs; links
# deliver ~0.8 of their published rate to NCCL / KV copies.
STEP_OVERHEAD_S = 3e-3
LAYER_DISPATCH_S = 0.0  # an engine that replays CUDA graphs: launches cost ~nothing
ALLREDUCE_LATENCY_S = 15e-6
LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of a device's published figures, and fixed costs.

    - ``compute_efficiency``: of peak FLOP/s reached by the matmuls (prefill is
      compute-bound; decode's attention and large batches too);
    - ``bandwidth_efficiency``: of peak memory bandwidth reached reading weights and KV
      (decode is bandwidth-bound);
    - ``step_overhead_s``: fixed seconds per forward step (scheduling, sampling);
    - ``layer_dispatch_s``: host seconds to launch one decoder layer's kernels. Launches
      are asynchronous, so the host's time hides under the device's and bounds a step
      from below (layers × this) instead of adding to it; ~0 with CUDA graphs;
    - ``allreduce_latency_s``: fixed seconds per tensor-parallel all-reduce (two per layer);
    - ``link_efficiency``: of a link's published rate reached by all-reduces, pipeline
      sends and KV transfers;
    - ``source``: where the figures come from (shown in reports).
    """

    compute_efficiency: float = COMPUTE_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY
    step_overhead_s: float = STEP_OVERHEAD_S
    layer_dispatch_s: float = LAYER_DISPATCH_S
    allreduce_latency_s: float = ALLREDUCE_LATENCY_S
    link_efficiency: float = LINK_EFFICIENCY
    source: str = MEASURED_H200

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "bandwidth_efficiency", "link_efficiency"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise ValueError(f"calibration {name} must be in (0, 1], got {value!r}")
        for name in ("step_overhead_s", "layer_dispatch_s", "allreduce_latency_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"calibration {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Device:
    """One accelerator model and the cluster around it.

    ``flops``: dense bf16 FLOP/s; ``memory_bandwidth`` and ``memory_bytes``: HBM;
    ``nvlink_bytes_s``: NVLink per GPU as published (both directions together);
    ``internode_bytes_s``: the network per GPU between nodes (one direction);
    ``gpus_per_node``: GPUs sharing one NVLink domain. ``roofline`` False: step times
    must be measured (``cpu``)."""

    name: str
    flops: float
    memory_bandwidth: float
    memory_bytes: int
    nvlink_bytes_s: float
    internode_bytes_s: float
    gpus_per_node: int
    roofline: bool = True
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and not (math.isfinite(value) and value > 0):
                raise ValueError(f"device {self.name!r}: {f.name} must be > 0, got {value!r}")

    @property
    def nvlink_one_way(self) -> float:
        """Bytes/s one GPU sends to another in its node: half the published NVLink
        figure (it counts both directions), times the link efficiency."""
        return self.nvlink_bytes_s / 2 * self.calibration.link_efficiency

    @property
    def internode_one_way(self) -> float:
        """Bytes/s one GPU sends to a GPU of another node, times the link efficiency."""
        return self.internode_bytes_s * self.calibration.link_efficiency

    def calibrated(self, **overrides: Any) -> Device:
        """This device with some ``Calibration`` fields replaced (ValueError naming an
        unknown field or a bad value)."""
        known = {f.name for f in fields(Calibration)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown calibration fields {unknown} (known: {sorted(known)})")
        return replace(self, calibration=replace(self.calibration, **overrides))

    def with_internode(self, bytes_s: float) -> Device:
        """This device in a cluster whose nodes are linked at ``bytes_s`` per GPU."""
        return replace(self, internode_bytes_s=bytes_s)


IB_400G = 400e9 / 8  # 400 Gb/s InfiniBand (ConnectX-7) per GPU
DISTSERVE_LOW_AFFINITY = 25e9 / 8  # DistServe's low node-affinity cluster: 25 Gb/s


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: a figure that never binds
        return 64 * 2**30


DEVICES: dict[str, Device] = {
    # H100 SXM5 80 GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s.
    "h100": Device("h100", 989e12, 3.35e12, int(80 * GB), 900 * GB, IB_400G, 8),
    # H200 SXM 141 GB: the H100's compute, 4.8 TB/s HBM3e, NVLink 4 900 GB/s.
    "h200": Device("h200", 989e12, 4.8e12, int(141 * GB), 900 * GB, IB_400G, 8),
    # A100 SXM4 80 GB: 312 TFLOP/s dense bf16, 2.0 TB/s HBM2e, NVLink 3 600 GB/s.
    "a100": Device("a100", 312e12, 2.0e12, int(80 * GB), 600 * GB, IB_400G, 8),
}
CPU = "cpu"
DEVICE_NAMES = (*DEVICES, CPU)


def cpu_device(workers: int) -> Device:
    """This machine as ``workers`` CPU workers on one node: KV moves between worker
    processes at the measured gloo rate (``router.bandwidth``); compute figures are
    unused (step times are measured)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    calib = Calibration(link_efficiency=1.0, source="measured on this machine")
    bw = DEFAULT_BANDWIDTH_BYTES_S
    return Device(CPU, 1.0, 1.0, _host_memory_bytes(), 2 * bw, bw, workers, False, calib)


def get_device(name: str, workers: int) -> Device:
    """The device called ``name`` (``DEVICE_NAMES``); ValueError naming the choices."""
    if name == CPU:
        return cpu_device(workers)
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(DEVICE_NAMES)})")
    return DEVICES[name]


def load_calibration(device: Device, path: str | Path) -> Device:
    """``device`` with the ``Calibration`` fields of a JSON object file applied, e.g.
    ``{"compute_efficiency": 0.55, "source": "pdserve prefill, H200, 2025-06"}``."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of calibration fields")
    return device.calibrated(**data)
