"""The README's plugin example is real code: it must run through the encoder as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cell_example_runs_deep_and_bidirectional_with_padding():
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "class MinimalGRU" in b
    )
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["rnnbench_cells"]() == {"mgu": namespace["MinimalGRU"]}

    from rnnbench.encoder import Encoder

    enc = Encoder(namespace["MinimalGRU"], 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, requires_grad=True)
    out, final = enc(x, torch.tensor([6, 4, 2, 1]))
    assert out.shape == (4, 6, 10) and len(final) == 4
    assert torch.all(out[3, 1:] == 0)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
