"""Backends that run engine instances: `process` (child processes) and `docker` (containers)."""
