"""Byte sizes as people write them ("80GiB", "24GB") and as the planner prints them."""

from __future__ import annotations

import re
from decimal import Decimal

# Decimal (KB = 1000) and binary (KiB = 1024) units, matched case-insensitively.
_UNITS = {"": 1, "b": 1} | {
    f"{p}{suffix}": base ** (i + 1)
    for i, p in enumerate("kmgtp")
    for suffix, base in (("b", 1000), ("ib", 1024))
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit, decimal (KB, MB, GB, TB, PB)
    or binary (KiB, MiB, GiB, TiB, PiB), case-insensitive: "80GiB", "1.5TiB", "1000000".
    Fractions of a byte are dropped. ValueError naming ``text`` if it is not one."""
    m = _BYTES_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse {text!r} as a byte size: expected a number with an optional "
            "unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB"
        )
    return int(Decimal(m.group(1)) * _UNITS[unit])  # Decimal: "1.5TiB" is exact


def format_bytes(n: int) -> str:
    """``n`` in the largest binary unit (up to TiB) that keeps it >= 1, two decimals."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"
