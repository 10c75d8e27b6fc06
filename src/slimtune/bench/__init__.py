"""Benchmarking: grid configs, the cached resumable runner, the report, and the demo (the main job)."""
