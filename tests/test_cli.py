"""The CLI's error contract: one readable line, no traceback unless --debug."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rnnbench.cli import app


def _boom(**_):
    raise ValueError("something inside broke\nsecond line")


def test_unexpected_error_is_one_line(monkeypatch):
    monkeypatch.setattr("rnnbench.catalog.load", _boom)
    result = CliRunner().invoke(app, ["list", "cells"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "ValueError: something inside broke" in lines[0] and "--debug" in lines[0]


def test_debug_shows_the_exception(monkeypatch):
    monkeypatch.setattr("rnnbench.catalog.load", _boom)
    result = CliRunner().invoke(app, ["--debug", "list", "cells"])
    assert isinstance(result.exception, ValueError)


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["--version"]])
def test_click_own_exits_pass_through(args):
    assert CliRunner().invoke(app, args).exit_code == 0
