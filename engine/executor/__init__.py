"""The orchestration above the runner for a TP group of size > 1: the executor (rank 0's side),
the follower actors, the step channel (shared-memory ring with a gloo fallback), whole-group KV
operations, the watchdog and the Ray launch. Imported only when such a group starts (it needs
Ray). What the layers use, the TP group and its collectives, is `engine.distributed`.
"""
