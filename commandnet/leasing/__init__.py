"""Lease strategies beyond the core protocol's lease per step (sticky execution)."""
