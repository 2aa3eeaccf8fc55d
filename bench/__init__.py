"""`make bench`: kcd-proxy against nginx on the same machine (see bench/run.py)."""
