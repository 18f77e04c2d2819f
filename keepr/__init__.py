"""Shared helpers for KEEP:R: errors, atomic file output, hashing."""
