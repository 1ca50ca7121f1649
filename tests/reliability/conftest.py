"""Helpers of the reliability suite: the command line as a user meets it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fl_attack.cli import main

REPO = Path(__file__).resolve().parents[2]

CliRunner = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    """Run ``fl-attack ARGV`` in-process from ``tmp_path``; returns (exit code, stdout, stderr).

    argparse's own errors end in ``SystemExit``; its code is returned like the others.
    The working directory is the test's own, so a case that wrongly runs writes nothing
    into the repository.
    """
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit code 2, no traceback, nothing on stdout, and every fragment in the message."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    assert out == ""
    flat = " ".join(err.split())  # rich may wrap a long line
    missing = [f for f in fragments if " ".join(f.split()) not in flat]
    assert not missing, f"{missing} not in: {err}"


@pytest.fixture
def user_error(cli: CliRunner) -> Callable[..., str]:
    """Run ``fl-attack ARGV`` and assert a user error naming every fragment; returns stderr."""

    def check(argv: tuple[str, ...] | list[str], *fragments: str) -> str:
        code, out, err = cli(*argv)
        assert_user_error(code, out, err, *fragments)
        return err

    return check
