"""Planning: suite files, stored tuning, and their expansion into benches and points."""
