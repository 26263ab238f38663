"""Generated protobuf and gRPC code for the opscore.v1 API. Do not edit;
regenerate with `make protos`."""
