"""Small pure helpers every layer may use (no torch: the router imports them)."""
