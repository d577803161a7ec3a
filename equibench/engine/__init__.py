"""Execution: the one loop over points (engine), workers, limits, locks, isolated environments, executors."""
