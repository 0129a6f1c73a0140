"""The tiered KV store: HBM (the engine's pool) -> pinned CPU slab -> NVMe files."""
