"""The committed stubs are what protoc makes of protos/pdserve.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
STUBS = ("pdserve_pb2.py", "pdserve_pb2_grpc.py", "pdserve_pb2.pyi")


def test_stubs_are_current(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "pdserve.proto").write_bytes(
        (ROOT / "protos/pdserve.proto").read_bytes()
    )
    out = "--python_out=.", "--grpc_python_out=.", "--pyi_out=."
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *out, "protos/pdserve.proto"]
    subprocess.run(cmd, cwd=tmp_path, check=True)
    for name in STUBS:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert committed == fresh, f"protos/{name} is stale: run `make protos`"


def test_stubs_import_from_the_package() -> None:
    from protos import pdserve_pb2, pdserve_pb2_grpc

    assert pdserve_pb2.DESCRIPTOR.package == "pdserve.v1"
    assert hasattr(pdserve_pb2_grpc, "PDServeStub")
    req = pdserve_pb2.GenerateRequest(text="hi", sampling=pdserve_pb2.SamplingParams(max_tokens=3))
    assert req.WhichOneof("prompt") == "text" and req.sampling.HasField("max_tokens")
