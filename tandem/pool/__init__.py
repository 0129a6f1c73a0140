"""What every pool worker shares (the engine thread, the KV view, load snapshots, calibrated
cost models, metrics, the step outbox) and the colocated worker, which runs both phases in one
engine. `prefill_worker/` and `decode_worker/` build on it.
"""
