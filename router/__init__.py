"""Routing, the latency model, admission, the gRPC frontend, the Ray controller, the CLI."""
