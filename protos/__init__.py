"""The public gRPC API (issue: router and API): .proto files and generated stubs."""
