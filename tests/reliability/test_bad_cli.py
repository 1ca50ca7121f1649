"""Bad flags and bad run folders: one line saying what and how to fix, exit code 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.reporting.checkpoint import (
    CHECKPOINT_FILE,
    SCENARIO_FILE,
    Checkpoint,
    save_checkpoint,
    write_scenario,
)
from fl_attack.reporting.leaks import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]
DEFAULT = str(REPO / "scenarios" / "default.toml")

# (case id, argv, fragments the message must hold)
CASES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("no-command", (), ("the following arguments are required: COMMAND",)),
    ("unknown-command", ("attack",), ("invalid choice: 'attack'", "reconstruct", "run")),
    ("run-without-scenario", ("run",), ("no scenario given", "--resume RUN_DIR")),
    ("run-rounds-not-an-int", ("run", DEFAULT, "--rounds", "two"), ("--rounds", "'two'")),
    ("run-zero-rounds", ("run", DEFAULT, "--rounds", "0"), ("override run.rounds", "rounds = 0")),
    (
        "run-zero-clients",
        ("run", DEFAULT, "--clients", "0"),
        ("override data.num-clients", "num-clients = 0"),
    ),
    (
        "run-fewer-clients-than-min",
        ("run", DEFAULT, "--clients", "1"),
        ("min-clients = 2", "exceeds [data] num-clients = 1"),
    ),
    ("run-name-with-slash", ("run", DEFAULT, "--name", "a/b"), ("[run] name = 'a/b'",)),
    (
        "run-missing-data-dir",
        ("run", str(REPO / "scenarios" / "mnist.toml"), "--data-dir", "/nonexistent/data"),
        ("[data] data-dir", "is not a folder"),
    ),
    ("unknown-flag", ("run", DEFAULT, "--turns", "2"), ("unrecognized arguments: --turns",)),
    (
        "run-out-dir-is-a-file",
        ("run", DEFAULT, "--out-dir", str(REPO / "README.md")),
        ("[run] out-dir: cannot write the run folder", "README.md/default", "--out-dir"),
    ),
    ("reconstruct-unknown-dataset", ("reconstruct", "-d", "imagenet"), ("unknown dataset",)),
    (
        "reconstruct-index-out-of-range",
        ("reconstruct", "-d", "faces", "-i", "200"),
        ("--index 200 is out of range", "0..199"),
    ),
    ("reconstruct-bad-dtype", ("reconstruct", "-d", "faces", "--dtype", "float16"), ("--dtype",)),
    (
        "reconstruct-unknown-model",
        ("reconstruct", "-d", "faces", "--model", "resnet"),
        ("unknown model 'resnet'", "rconv-main"),
    ),
    (
        "reconstruct-unknown-activation",
        ("reconstruct", "-d", "faces", "-a", "GELU"),
        ("unknown activation 'GELU'", "ReLU"),
    ),
    (
        "reconstruct-missing-data-dir",
        ("reconstruct", "-d", "mnist", "--data-dir", "/nonexistent/data"),
        ("'/nonexistent/data'", "does not exist", "--data-dir"),
    ),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_command_line_is_one_message_and_exit_code_2(
    argv: tuple[str, ...], fragments: tuple[str, ...], user_error: Callable[..., str]
) -> None:
    user_error(argv, *fragments)


# ---------------------------------------------------------------- --resume


def _scenario(tmp_path: Path, rounds: int = 3) -> ScenarioConfig:
    return load_scenario(
        DEFAULT, {"run.out-dir": str(tmp_path / "runs"), "run.rounds": rounds, "run.name": "r"}
    )


def _run_folder(tmp_path: Path, done: int, *, rounds: int = 3) -> Path:
    """A run folder as a run killed after ``done`` rounds leaves it."""
    scenario = _scenario(tmp_path, rounds)
    run_dir = scenario.run.run_dir
    digest = write_scenario(run_dir, scenario)
    if done:
        arrays = {"classifier.bias": torch.zeros(10)}
        save_checkpoint(run_dir, Checkpoint(done, arrays, digest, {0: 0.5}, {1: 0.1}))
    return run_dir


def test_resume_of_a_missing_folder(tmp_path: Path, user_error: Callable[..., str]) -> None:
    user_error(("run", "--resume", str(tmp_path / "gone")), "no such folder", "<out-dir>/<name>")


def test_resume_of_a_folder_that_is_not_a_run(
    tmp_path: Path, user_error: Callable[..., str]
) -> None:
    user_error(("run", "--resume", str(tmp_path)), "is not a run folder", SCENARIO_FILE)


def test_resume_with_other_options(tmp_path: Path, user_error: Callable[..., str]) -> None:
    run_dir = _run_folder(tmp_path, 1)
    user_error(
        ("run", DEFAULT, "--resume", str(run_dir), "--rounds", "5"),
        "SCENARIO, --rounds cannot be combined with it",
        "drop them",
    )


def test_resume_with_a_truncated_checkpoint(tmp_path: Path, user_error: Callable[..., str]) -> None:
    # Prepare: cut the checkpoint in half, as a full disk would
    run_dir = _run_folder(tmp_path, 2)
    data = (run_dir / CHECKPOINT_FILE).read_bytes()
    (run_dir / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    # Execute / Assert
    user_error(("run", "--resume", str(run_dir)), CHECKPOINT_FILE, "cannot be read", "delete it")


def test_resume_after_the_scenario_was_edited(
    tmp_path: Path, user_error: Callable[..., str]
) -> None:
    run_dir = _run_folder(tmp_path, 1)
    saved = run_dir / SCENARIO_FILE
    saved.write_text(saved.read_text().replace("lr = 0.013", "lr = 0.02"))
    user_error(("run", "--resume", str(run_dir)), "scenario.toml was edited", "restore it")


def test_resume_with_a_broken_saved_scenario(
    tmp_path: Path, user_error: Callable[..., str]
) -> None:
    run_dir = _run_folder(tmp_path, 0)
    saved = run_dir / SCENARIO_FILE
    saved.write_text(saved.read_text().replace("rounds = 3", "rounds = -1"))
    user_error(("run", "--resume", str(run_dir)), "[run] rounds = -1", "an int >= 1")


def test_resume_of_a_finished_run_does_nothing(
    tmp_path: Path, cli: Callable[..., tuple[int, str, str]]
) -> None:
    # Prepare: every round done and the summary written
    run_dir = _run_folder(tmp_path, 3, rounds=3)
    (run_dir / SUMMARY_FILE).write_text("{}\n")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    # Execute
    code, out, err = cli("run", "--resume", str(run_dir))
    # Assert: exit 0, says so, touches nothing
    assert code == 0 and err == ""
    assert "already finished all 3 rounds; nothing to do" in " ".join(out.split())
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
