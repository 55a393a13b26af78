"""Usage errors: one line, `layerdiff: usage error: ...` with the command's --help to see, exit 2."""

from __future__ import annotations

import pytest

from conftest import EXAMPLE, run_cli


@pytest.mark.parametrize("args, problem, command", [
    (["scan"], "Missing argument 'MODEL'.", "layerdiff scan"),
    (["scan", str(EXAMPLE), "--jobs", "-1"], "Invalid value for '--jobs': -1 is not in the range x>=0.", "layerdiff scan"),
    (["scan", str(EXAMPLE), "--sketch", "8"], "--sketch applies to --rank-approx", "layerdiff scan"),
    (["scan", str(EXAMPLE), "--bogus"], "No such option '--bogus'.", "layerdiff scan"),
    (["inspect", "a", "b"], "Got unexpected extra argument (b)", "layerdiff inspect"),
    (["plot", "/no/such/result.json", "-o", "p.png"], "Invalid value for 'RESULT': File '/no/such/result.json' does not exist.",
     "layerdiff plot"),
    (["plot"], "Missing argument 'RESULT'.", "layerdiff plot"),
    (["nope"], "No such command 'nope'.", "layerdiff"),
    (["--bogus"], "No such option '--bogus'.", "layerdiff"),
])
def test_usage_errors_are_one_line_with_exit_2(args, problem, command):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"layerdiff: usage error: {problem}"), lines[0]
    assert lines[0].endswith(f" (see {command} --help)"), lines[0]


def test_help_and_version_still_exit_0():
    for args in (["--help"], ["scan", "--help"], ["--version"]):
        r = run_cli(*args)
        assert r.returncode == 0 and r.stdout and r.stderr == "", (args, r.stderr)
    assert run_cli("scan", "--help").stdout.startswith("Usage: layerdiff scan [OPTIONS] MODEL")


def test_no_command_shows_the_help():
    r = run_cli()
    assert r.returncode == 2 and "Commands:" in r.stderr + r.stdout
