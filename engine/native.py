"""Small C kernels for the CPU paths, built on first use and loaded with ctypes.

Each kernel is one C file beside the module that uses it. It is compiled with the
system's C compiler (``cc``, ``-O3 -march=native``) into a cache directory
(``PDSERVE_KERNEL_CACHE``, default ``~/.cache/pdserve``) under a name keyed by the
source, the flags and the CPU, so a later process (a Ray worker, the next test) loads
it at once; a build takes well under a second here. Where there is no compiler, or
with ``PDSERVE_CPU_KERNELS=0`` in the environment, :func:`load` returns None and the
callers keep their torch/Python path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC")
_log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether kernels may be used (``PDSERVE_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get("PDSERVE_CPU_KERNELS", "1") != "0"


@functools.cache
def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("PDSERVE_KERNEL_CACHE", Path.home() / ".cache" / "pdserve"))


def _build(source: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name, then renamed: concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = ["cc", *FLAGS, str(source), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, includes: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """The kernel built from ``source`` (built now if this machine has not yet), or
    None where it cannot be (no compiler, kernels switched off). ``includes``: the
    files ``source`` includes (part of the build's key). Callers cache it."""
    if not enabled():
        return None
    text = b"".join(f.read_bytes() for f in (source, *includes))
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_id().encode())
    path = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(source, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        _log.warning("CPU kernel %s unavailable (%s): using the fallback", source.name, e)
        return None
