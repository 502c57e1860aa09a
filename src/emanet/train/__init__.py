"""Training: the loop (loop.py), its set-up (setup.py), training data (data.py), run folders (runs.py)
and the torchrun plumbing (distributed.py)."""
