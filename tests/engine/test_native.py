"""Built-on-first-use C kernels: cached by source, refused politely."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from engine import native


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_once_and_loads_what_it_built(cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "add.c"
    src.write_text("long add(long a, long b) { return a + b; }\n")
    lib = native.load(src)
    assert lib is not None
    lib.add.restype, lib.add.argtypes = ctypes.c_long, [ctypes.c_long, ctypes.c_long]
    assert lib.add(40, 2) == 42
    (built,) = cache.glob("add-*.so")
    stamp = built.stat().st_mtime_ns
    assert native.load(src) is not None and built.stat().st_mtime_ns == stamp  # reused
    src.write_text("long add(long a, long b) { return a - b; }\n")  # a new source: a new build
    assert native.load(src) is not None and len(list(cache.glob("add-*.so"))) == 2


def test_a_source_that_does_not_build_gives_none(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "broken.c"
    src.write_text("this is not C\n")
    assert native.load(src) is None
    assert "broken.c unavailable" in caplog.text
    assert list(cache.iterdir()) == []  # no half-built file left behind


def test_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    src = tmp_path / "add.c"
    src.write_text("long add(long a, long b) { return a + b; }\n")
    assert not native.enabled() and native.load(src) is None
