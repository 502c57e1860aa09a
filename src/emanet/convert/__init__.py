"""Checkpoint import from the authors' code, mmsegmentation and ImageNet backbone files."""
