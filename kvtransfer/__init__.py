"""KV transfer between two TP×PP layouts (issue: disaggregated pools): layout mapping,
transfer plans, transports (torch.distributed NCCL/gloo, gRPC, local), leases, acks."""
