"""The engine runs in one process without Ray (issue 2: keep the engine free of it)."""

from __future__ import annotations

import subprocess
import sys

_BLOCK_RAY = """
import sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, NoRay())
import decode.llm, decode.instance, engine.core, prefill.instance
print("ok", "ray" in sys.modules)
"""


def test_engine_imports_without_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK_RAY], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "False"]
