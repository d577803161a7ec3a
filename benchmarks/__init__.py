"""asv benchmarks of equibench (see common.py for profiles, device and threads)."""
