"""Prefill instances (issue: disaggregated pools): token-budget batching, chunking,
first-token sampling and KV leases until decode acknowledges the transfer."""
