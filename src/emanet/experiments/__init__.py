"""The paper's experiments: the demo (demo.py), the studies (study.py), their reports and plots."""
