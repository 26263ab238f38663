"""gRPC glue: servicers translate protobuf to domain calls; nothing else lives here."""
