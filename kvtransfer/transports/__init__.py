"""KV transports: `fake` (in-process), `grpc_stream` (across hosts, CPU), `torch_p2p` (NCCL)."""
