"""The GPU check as a script: the same as ``rnnbench bench --check`` (see rnnbench/gpu_check.py).

python benchmarks/gpu_check.py      # on a CUDA machine: checks, then the ratio table; else one line, exit 0
"""

import sys

from rnnbench.gpu_check import run_check

if __name__ == "__main__":
    sys.exit(run_check())
