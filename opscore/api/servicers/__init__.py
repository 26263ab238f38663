"""One servicer per service: protobuf in, domain call, protobuf out."""
