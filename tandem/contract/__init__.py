"""The worker contract: the messages between the router and the pool workers, load snapshots,
cost models, and the metrics plumbing both sides share. Pure: no torch, no gRPC; the router and
every worker import it, and it imports neither.
"""
