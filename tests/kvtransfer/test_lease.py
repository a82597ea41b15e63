"""Leases: grant, claim (extends), release (the ack), expiry."""

from __future__ import annotations

import pytest

from kvtransfer.lease import LeaseTable


def test_release_returns_item_once() -> None:
    t: LeaseTable[str] = LeaseTable(10.0)
    assert t.grant("a", "blocks-a", now=0.0) == 10.0
    assert "a" in t and len(t) == 1
    assert t.release("a") == "blocks-a"
    assert t.release("a") is None
    assert len(t) == 0


def test_expiry_frees_only_past_deadlines() -> None:
    t: LeaseTable[int] = LeaseTable(5.0)
    t.grant("a", 1, now=0.0)
    t.grant("b", 2, now=3.0)
    assert t.next_deadline() == 5.0
    assert t.expire(now=4.9) == []
    assert t.expire(now=5.0) == [("a", 1)]
    assert t.num_expired == 1
    assert t.items() == [2]


def test_claim_extends_and_fails_after_expiry() -> None:
    t: LeaseTable[int] = LeaseTable(5.0)
    t.grant("a", 1, now=0.0)
    assert t.claim("a", now=4.0, hold_s=10.0)
    assert t.expire(now=13.9) == []  # extended to 14
    assert t.expire(now=14.0) == [("a", 1)]
    t.grant("b", 2, now=0.0)
    assert not t.claim("b", now=5.0, hold_s=10.0)  # ran out first
    assert not t.claim("unknown", now=0.0, hold_s=1.0)


def test_bad_values() -> None:
    with pytest.raises(ValueError, match="ttl_s must be > 0, got 0"):
        LeaseTable(0)
    t: LeaseTable[int] = LeaseTable(1.0)
    t.grant("a", 1, now=0.0)
    with pytest.raises(ValueError, match="'a' already holds a lease"):
        t.grant("a", 2, now=0.0)
