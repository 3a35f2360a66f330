"""The seams into transformers: cache, registered attention, rotary swap, wrap/unwrap."""
