"""Parity of a bit sequence as an rnnbench task (an example third-party task plugin)."""

from rnnbench_parity.task import ParityTask, parity_data

__version__ = "0.1.0"
__all__ = ["ParityTask", "__version__", "parity_data"]
