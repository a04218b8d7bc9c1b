"""The CLI entry point: help, version, one-line errors."""

from __future__ import annotations


def test_help_and_version(run_cli):
    res = run_cli("--help")
    assert res.code == 0 and "world" in res.out
    res = run_cli("--version")
    assert res.code == 0 and res.out.strip() == "0.1.0"


def test_unknown_command_is_a_usage_error(run_cli):
    res = run_cli("frobnicate")
    assert res.code == 2
    assert "Traceback" not in res.err
