"""Builtin cells. Each module is a plugin registering one cell through ``rnnbench_cells``."""
