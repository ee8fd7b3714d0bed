"""Budgets to convergence: a study records whether its final seeds stopped by patience
(converged) or reached the cap, and the CLI table and the report mark the cap-limited rows."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli

# Two benchmarks of one cell: one asks for an improvement no run can make, so patience runs out
# two validations after the first (converged); the other has no patience and stops at its cap.
EXPERIMENT = """\
name: conv
cells: [gru]
tasks:
  - name: memory
    label: still
    options: {problem: adding, seq_len: 6, train_size: 128, valid_size: 64, test_size: 64}
    budget: {trials: 0, max_steps: 16, eval_every: 4, patience: 2, min_improvement: 1.0e+9}
  - name: memory
    label: capped
    options: {problem: adding, seq_len: 6, train_size: 128, valid_size: 64, test_size: 64}
    budget: {trials: 0, max_steps: 8, eval_every: 4}
fixed: {hidden_size: 4, batch_size: 32}
final: {seeds: 2}
"""


def _run(args: list[str], home: Path):
    return run_cli(args, home, COLUMNS="100")


def test_converged_and_capped_seeds_are_told_apart(tmp_path: Path):
    (tmp_path / "conv.yaml").write_text(EXPERIMENT)
    home = tmp_path / "home"
    result = _run(["run", str(tmp_path / "conv.yaml")], home)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if "gru-1L-uni" in line}
    lines = result.stdout.splitlines()
    still = next(i for i, line in enumerate(lines) if line.strip().startswith("still"))
    capped = next(i for i, line in enumerate(lines) if line.strip().startswith("capped"))
    assert lines[still + 1].rstrip().endswith(" 2"), result.stdout  # converged: no mark
    assert lines[capped + 1].rstrip().endswith(" 2†"), result.stdout
    assert rows  # the architecture rows are printed

    import rnnbench
    from rnnbench.report.tables import _shown_stops

    results = rnnbench.load_results("conv", home=home)  # what `rnnbench report` ranks, in-process
    assert results.tables["still"].loc[0, ["converged", "at_cap"]].tolist() == [2, 0]
    assert results.tables["capped"].loc[0, ["converged", "at_cap"]].tolist() == [0, 2]
    assert any("† hit the cap" in note for note in results.notes)
    assert any("validation cost:" in note for note in results.notes)
    shown = [_shown_stops(results.tables[b].loc[0]) for b in ("still", "capped")]
    assert shown == ["2 converged", "† 2 at cap"]  # the report's "final seeds stopped" column
