"""A discrete-event simulator of pdserve: the same schedulers, admission and router
decisions as the real system, with step times from the fitted latency model and KV
transfers from bytes ÷ bandwidth, for any number of instances (no torch).

``simulate(trace, SimConfig(...)) -> SimResult``; ``trace`` rows are
``(arrival_s, prompt_len, output_len)``; ``poisson_trace`` makes one;
``python -m bench.sim.speed`` times it.

Where it may differ from a measured run:

- Step time is the latency model's prediction, nothing else: no noise, no contention
  between instances sharing cores or links, no Python or gRPC overhead around the
  forward, unless ``PoolSpec.step_overhead_s`` adds a fixed cost or
  ``PoolSpec.step_time_ratios`` multiplies each step by a measured observed ÷
  predicted ratio (``bench.sim.calibrate`` takes them from a real run). A mixed step
  (prefill chunks and decodes together) costs the prefill part plus the decode part,
  each with its own fixed term. The router predicts with the same model (no online
  refit).
- No prefix caching: every prompt (and every recompute after a preemption, which the
  real block manager often serves from its cache) is computed whole.
- A transfer moves the prompt's whole blocks at the pair's full bandwidth, one at a
  time per decode instance; pulls from one prefill instance by several decode
  instances do not share its bandwidth.
- Every request runs to ``output_len`` tokens (no eos, no aborts, no client delay).
- A prefill instance whose blocks are all leased waits for a release (counted in
  ``InstanceStats.kv_stalls``); the real engine raises there instead.
"""

from bench.sim.config import PoolSpec, SimConfig
from bench.sim.records import InstanceStats, SimRequest, SimResult, TraceRow
from bench.sim.simulate import Simulation, poisson_trace, simulate

__all__ = [
    "InstanceStats",
    "PoolSpec",
    "SimConfig",
    "SimRequest",
    "SimResult",
    "Simulation",
    "TraceRow",
    "poisson_trace",
    "simulate",
]
