"""Versioned bundles (weights + preprocessing spec + labels, checked by sha256) and the on-disk registry
of their versions and aliases."""
