"""Speculative decoding: proposers of draft tokens, their verification, and the per-request
lookahead policy. The scheduler reserves lookahead slots (engine/scheduler), the runner asks a
proposer for drafts and verifies them in one forward pass (engine/runner), and `update` appends
every accepted token (docs/architecture.md, "Speculative decoding")."""
