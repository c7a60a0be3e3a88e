"""The wire messages, generated from the repository's proto/mayfly/v1 by
`grpc_tools.protoc --python_out --pyi_out` (tests/test_stubs.py fails when
they differ from what the protos give). Do not edit the *_pb2 files."""
