"""The `emanet` command line."""
