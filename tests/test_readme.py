"""The README is short and true: its commands are CI's, its first experiment runs, its links resolve.

Its longer examples moved to the documentation site; tests/test_docs.py runs them there.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _ci_commands() -> list[str]:
    """The line after each `# --- README: ... ---` marker of .ci/run."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.startswith("# --- README:")]


def test_readme_set_up_block_is_exactly_the_two_commands_ci_runs():
    ci = _ci_commands()
    assert len(ci) == 2 and ci[1] == "pytest"
    found = re.findall(r"```bash\n(.*?)```", _section("Set up and test"), re.S)
    blocks = [b for b in found if "pip install -e" in b]  # the block before it: venv and PyTorch
    assert blocks == ["\n".join(ci) + "\n"], (
        "README's set-up block must hold .ci/run's two commands, byte for byte"
    )
    install = (ROOT / "docs" / "how-to" / "install.md").read_text()
    assert "```bash\n" + "\n".join(ci) + "\n```" in install


def test_readme_first_experiment_is_the_tutorials_and_is_valid():
    from rnnbench.experiment import expand, parse

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "name: first" in b)
    assert len(block.splitlines()) <= 15
    assert block == (ROOT / "docs" / "snippets" / "first.yaml").read_text()  # the tutorial's file
    studies, skipped = expand(parse(block, "README.md"))
    assert sorted(s.arch.label for s in studies) == ["gru-1L-uni", "gru-2L-uni", "lstm-1L-uni", "rnn-1L-uni"]
    assert not skipped


def test_readme_main_job_names_the_smoke_experiment():
    main = _section("The main job")
    assert "rnnbench run experiments/smoke.yaml" in main
    assert (ROOT / "experiments" / "smoke.yaml").is_file()


def test_readme_links_and_figure_resolve():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to the documentation"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert any(t.endswith(".png") for t in local)
