"""Test doubles behind the interfaces the real workers also implement (tests and bench/router.py
use them; nothing in a serving path does)."""
