"""A frozen teacher behind gRPC: the zoo, the checkpoint format, the server and its client."""
