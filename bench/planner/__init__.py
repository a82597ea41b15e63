"""The placement planner: DistServe's placement search (Algorithms 1 and 2) over
layouts and P:D counts, scored by the simulator (``bench.sim``) with step times from
a roofline of the device (``roofline.py``) or a measurement (``cpu_profile.py``).

``plan_placements(model, workers, ttft_ms, tpot_ms, PlanOptions(...))`` returns the
placements best first; ``pdserve plan`` prints them (``router/cli_plan.py``).
"""

from bench.planner.devices import DEVICE_NAMES, Calibration, Device, get_device
from bench.planner.placements import Candidate, Placement
from bench.planner.plan import PlanOptions, build_spec, plan_placements, run_plan
from bench.planner.roofline import Layout, Roofline
from bench.planner.search import Planner, PlanResult

__all__ = [
    "DEVICE_NAMES",
    "Calibration",
    "Candidate",
    "Device",
    "Layout",
    "Placement",
    "PlanOptions",
    "PlanResult",
    "Planner",
    "Roofline",
    "build_spec",
    "get_device",
    "plan_placements",
    "run_plan",
]
