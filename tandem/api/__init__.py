"""Generated gRPC stubs of the wire API (package `tandem.v1`, sources under `proto/`).

Never edit the `*_pb2*.py` files by hand: change `proto/tandem/v1/*.proto` and run
`python -m tandem.api.generate`. `tests/unit/test_proto_drift.py` fails if they diverge.
"""
