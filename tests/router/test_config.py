"""ServeConfig: YAML loading, overrides, and errors that name the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ServeConfig

EXAMPLE = Path(__file__).parents[2] / "examples" / "serve.yaml"
COLOCATED = EXAMPLE.with_name("colocated.yaml")


def test_example_loads() -> None:
    cfg = ServeConfig.from_yaml(EXAMPLE)
    assert cfg.prefill.tp == 1 and cfg.decode.max_num_seqs == 64
    assert cfg.kv.resolved_transport("cpu") == "gloo"
    assert cfg.kv.resolved_transport("cuda") == "nccl"
    assert cfg.server.port == 50051


def test_colocated_example_and_prefill_pool_of_zero() -> None:
    cfg = ServeConfig.from_yaml(COLOCATED)
    assert cfg.colocated and cfg.prefill.num_instances == 0
    assert cfg.decode.num_instances == 2 and cfg.decode.chunked_prefill
    assert not ServeConfig.from_yaml(EXAMPLE).colocated
    off = cfg.with_overrides(**{"decode.chunked_prefill": False})
    assert off.colocated and not off.engine_config("decode").scheduler.chunked_prefill
    # No KV moves in a colocated deployment: a transport it cannot use is no error.
    assert ServeConfig.from_dict({"prefill": {"num_instances": 0}, "kv": {"transport": "nccl"}})


def test_overrides_and_engine_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nprefill: {tp: 2, pp: 2, pp_boundaries: [1]}\nkv: {lease_s: 5}\n")
    cfg = ServeConfig.from_yaml(path).with_overrides(**{"decode.tp": 2, "kv.transport": "grpc"})
    assert (cfg.prefill.tp, cfg.prefill.pp, cfg.prefill.pp_boundaries) == (2, 2, (1,))
    assert cfg.decode.tp == 2 and cfg.kv.transport == "grpc" and cfg.kv.lease_s == 5.0
    eng = cfg.engine_config("prefill")
    assert eng.parallel.world_size == 4 and eng.model == "m"


def test_local_transport_shares_the_decode_pool() -> None:
    """Only a decode pool fed by the local transport on the CPU is in shared memory
    (the source writes into it directly); prefill pools never are."""
    local = ServeConfig.from_dict({"kv": {"transport": "local"}})
    assert local.engine_config("decode").cache.shared_memory
    assert not local.engine_config("prefill").cache.shared_memory
    for data in ({"kv": {"transport": "gloo"}}, {"prefill": {"num_instances": 0}}):
        assert not ServeConfig.from_dict({**data}).engine_config("decode").cache.shared_memory
    colocated = ServeConfig.from_dict(
        {"prefill": {"num_instances": 0}, "kv": {"transport": "local"}}
    )
    assert not colocated.engine_config("decode").cache.shared_memory


def test_auto_transport_is_local_on_a_one_node_cpu_cluster() -> None:
    """``auto`` settles on local (with a shared decode pool) when every instance must
    share the one host; explicit transports, CUDA, colocated deployments and clusters
    of several nodes keep what they had."""
    auto = ServeConfig.from_dict({})
    one = auto.for_cluster(1)
    assert one.kv.transport == "local" and one.engine_config("decode").cache.shared_memory
    assert auto.for_cluster(3) is auto and auto.kv.resolved_transport("cpu") == "gloo"
    for data in (
        {"kv": {"transport": "grpc"}},
        {"prefill": {"num_instances": 0}},
        {"device": "cuda"},
    ):
        cfg = ServeConfig.from_dict(data)
        assert cfg.for_cluster(1) is cfg
    with pytest.raises(ValueError, match="num_nodes must be >= 1, got 0"):
        auto.for_cluster(0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prefill": {"tpp": 2}}, "unknown key 'prefill.tpp'"),
        ({"decode": {"tp": "two"}}, "decode.tp must be int, got 'two'"),
        ({"kv": {"transport": "carrier-pigeon"}}, "got 'carrier-pigeon'"),
        ({"kv": {"transport": "nccl"}}, "needs device 'cuda'"),
        ({"kv": {"lease_s": 0}}, "kv.lease_s must be > 0, got 0"),
        ({"prefill": {"policy": "lifo"}}, "got 'lifo'"),
        ({"decode": {"num_instances": 0}}, "num_instances must be >= 1, got 0"),
        ({"prefill": {"num_instances": -1}}, "num_instances must be >= 0, got -1"),
        ({"prefill": {"pp": 2, "pp_boundaries": [0]}}, "must be >= 1"),
        ({"server": {"port": 70000}}, "server.port must be in"),
        ({"slo": {"tpot_s": -1}}, "slo.tpot_s must be > 0"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_config(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeConfig.from_dict(data)  # type: ignore[arg-type]


def test_unknown_override() -> None:
    with pytest.raises(ValueError, match="unknown config key 'decode.tq'"):
        ServeConfig().with_overrides(**{"decode.tq": 2})
