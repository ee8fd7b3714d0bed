"""Builtin tasks; each module is a plugin registering through ``rnnbench_tasks``."""
