"""Memory units, representatives, position policies and per-layer memory state (no transformers)."""
