"""Dataset layer: where files come from (resolve.py) and how they are read (readers per task)."""

from rnnbench.data.resolve import DataFile, cache_dir, resolve

__all__ = ["DataFile", "cache_dir", "resolve"]
