"""A real ``fl-attack run`` killed with SIGKILL mid-run, then ``--resume``: no record lost.

The run is a subprocess in its own session (the Simulation runtime's workers with it);
once a round is complete (``checkpoint.pt``) and, at best, the next one half logged, the
whole process group is killed without warning. Every completed round's records and
pictures must be intact, and ``fl-attack run --resume`` must finish the run with every
client-round logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg

from fl_attack.reporting.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fl_attack.reporting.leaks import LEAKS_FILE, SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]
CLIENTS, ROUNDS = 4, 3
DEADLINE = 120.0  # seconds to reach the first checkpoint; a run takes ~15 s to get there


def _scenario(tmp_path: Path) -> Path:
    text = (REPO / "scenarios" / "default.toml").read_text(encoding="utf-8")
    text = (
        text.replace('name = "default"', 'name = "killed"')
        .replace("rounds = 3", f"rounds = {ROUNDS}")
        .replace('out-dir = "runs"', f"out-dir = {json.dumps(str(tmp_path / 'runs'))}")
        .replace("num-clients = 8", f"num-clients = {CLIENTS}")
    )
    path = tmp_path / "killed.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        OMP_NUM_THREADS="1",
    )
    return env


def _records(run_dir: Path) -> list[tuple[str, dict]]:
    """(line, parsed record) of every whole line of the leak log; a torn line is skipped."""
    out = []
    for line in (run_dir / LEAKS_FILE).read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def _mid_round(run_dir: Path) -> bool:
    """A round is complete and the next has records, or two rounds are complete."""
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return False
    checkpoint = load_checkpoint(run_dir)
    done = checkpoint.server_round if checkpoint else 0
    return done >= 2 or any(r["server_round"] > done for _, r in _records(run_dir))


def test_a_sigkilled_run_resumes_without_losing_a_record(tmp_path: Path) -> None:
    # Prepare
    scenario = _scenario(tmp_path)
    run_dir = tmp_path / "runs" / "killed"
    command = [sys.executable, "-m", "fl_attack", "run"]
    log = (tmp_path / "first.log").open("wb")
    process = subprocess.Popen(
        [*command, str(scenario)],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches the workers too
    )
    try:
        # Execute: SIGKILL once a round is complete, at best while the next one is being
        # logged (some of its records written, its checkpoint not yet)
        start = time.monotonic()
        while not _mid_round(run_dir):
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() - start < DEADLINE, "no round completed in time"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
    assert process.returncode == -signal.SIGKILL

    # Assert: every completed round is intact and readable
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None
    done = checkpoint.server_round
    assert 1 <= done < ROUNDS
    killed = _records(run_dir)
    completed = [line for line, r in killed if r["server_round"] <= done]
    cut = [r for _, r in killed if r["server_round"] > done]
    assert len(completed) == CLIENTS * done
    for r in range(1, done + 1):
        picture = mpimg.imread(run_dir / f"round_{r}.png")
        assert picture.ndim == 3 and picture.shape[0] > 100
    assert not (run_dir / SUMMARY_FILE).exists()

    # Execute: resume
    resumed = subprocess.run(
        [*command, "--resume", str(run_dir)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )

    # Assert: the run finished, every client-round logged exactly once
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{done} of {ROUNDS} rounds completed" in " ".join(resumed.stdout.split())
    final = _records(run_dir)
    keys = [(r["server_round"], r["partition_id"]) for _, r in final]
    expected = {(rnd, p) for rnd in range(1, ROUNDS + 1) for p in range(CLIENTS)}
    lost = len(expected - set(keys))
    assert lost == 0 and len(keys) == len(set(keys)) == len(expected)
    assert [line for line, _ in final[: len(completed)]] == completed  # kept byte for byte
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert [r["clients"] for r in summary["rounds"]] == [CLIENTS] * ROUNDS
    assert sorted(p.name for p in run_dir.glob("round_*.png")) == [
        f"round_{r}.png" for r in range(1, ROUNDS + 1)
    ]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries
    print(
        f"\nkill/resume: {done} of {ROUNDS} rounds completed before SIGKILL "
        f"({len(cut)} records of the cut round dropped), {ROUNDS - done} rounds recovered "
        f"by --resume, {len(final)} records, records lost: {lost}"
    )
