"""``fl-attack run``: a bad scenario is one line on stderr and exit code 2, before any runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_attack.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_scenario_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "no such file" in err and "scenarios/default.toml" in err


def test_unknown_key_in_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Prepare
    text = (
        (REPO / "scenarios" / "default.toml")
        .read_text()
        .replace("rounds = 3", "rounds = 3\nrouns = 4")
    )
    path = tmp_path / "typo.toml"
    path.write_text(text)
    # Execute
    code, out, err = _run(capsys, "run", str(path))
    # Assert
    assert code == 2 and out == ""
    assert "unknown key [run] rouns" in err


def test_bad_override_from_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "run", str(REPO / "scenarios" / "default.toml"), "--rounds", "0")
    assert code == 2
    assert "override run.rounds" in err and "[run] rounds = 0" in err


def test_missing_data_folder_from_a_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(
        capsys,
        "run",
        str(REPO / "scenarios" / "cifar10.toml"),
        "--data-dir",
        str(tmp_path / "missing"),
    )
    assert code == 2 and "[data] data-dir" in err and "is not a folder" in err
