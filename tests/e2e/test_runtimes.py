"""End to end through Flower's real runtimes: Simulation (``fl-attack run``), ``flwr run .``
and the Deployment Engine on loopback. Every process started here is stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GOOD_DB = 40.0

pytestmark = pytest.mark.e2e


# ---------------------------------------------------------------- helpers


def _free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flower_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower commands: a private FLWR_HOME, no telemetry, no installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    )
    home.mkdir(parents=True, exist_ok=True)
    return env


def _pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment holds ``key=value`` exactly."""
    wanted = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each PID, then SIGKILL those still alive after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A private FLWR_HOME; afterwards every process that carries it is stopped by PID."""
    home = tmp_path / "flwr-home"
    yield home
    _stop_pids(_pids_with_env("FLWR_HOME", str(home)))
    assert not _pids_with_env("FLWR_HOME", str(home)), "a Flower process survived its test"


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _leak_log(run_dir: Path) -> list[dict]:
    """The lines of ``leaks.jsonl``, checked to agree with the round pictures and audits."""
    lines = [json.loads(x) for x in (run_dir / "leaks.jsonl").read_text().splitlines()]
    rounds = {x["server_round"] for x in lines}
    pictures = {int(p.stem.split("_")[1]) for p in run_dir.glob("round_*.png")}
    assert rounds == pictures, (rounds, pictures)
    keys = [(x["server_round"], x["node_id"]) for x in lines]
    assert len(keys) == len(set(keys)), "one line per client and round"
    audited = {int(p.stem.split("_")[1]) for p in (run_dir / "audit").glob("node_*.jsonl")}
    assert {x["node_id"] for x in lines} == audited
    assert (run_dir / "summary.json").is_file()
    return lines


def _fl_attack(*args: str, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run the ``fl-attack`` command line."""
    return subprocess.run(
        [str(BIN / "fl-attack"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------- tests


def _flwr_run(
    target: list[str], run_config: str, *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``flwr run REPO TARGET... --run-config RUN_CONFIG --stream``, output captured."""
    return subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), *target, "--run-config", run_config, "--stream"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_default_scenario_leaks_every_client_round_through_run_simulation(
    tmp_path: Path,
) -> None:
    # Execute: what `make run` runs, writing into a temporary folder
    done = _fl_attack(
        "run", "scenarios/default.toml", "--out-dir", str(tmp_path), "--name", "e2e", cwd=REPO
    )
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pictures: " in done.stdout and "round_*.png" in done.stdout
    lines = _leak_log(tmp_path / "e2e")
    assert len(lines) == 24 and {x["server_round"] for x in lines} == {1, 2, 3}
    worst = min(x["psnr"] if isinstance(x["psnr"], float) else -1.0 for x in lines)
    assert worst >= GOOD_DB, [(x["server_round"], x["psnr"]) for x in lines]
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["leaked"] == summary["client_rounds"] == 24


def test_cifar10_accuracy_is_the_same_with_and_without_the_wrapper(
    tmp_path: Path, shared_datasets: Path
) -> None:
    # Prepare
    common = ("--clients", "3", "--rounds", "2", "--out-dir", str(tmp_path))
    # Execute
    attacked = _fl_attack("run", "scenarios/cifar10.toml", *common, "--name", "a", cwd=REPO)
    honest = _fl_attack(
        "run", "scenarios/cifar10.toml", *common, "--name", "b", "--no-attack", cwd=REPO
    )
    # Assert
    assert attacked.returncode == 0, attacked.stderr[-3000:]
    assert honest.returncode == 0, honest.stderr[-3000:]
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [r["test_accuracy"] for r in a["rounds"]] == [r["test_accuracy"] for r in b["rounds"]]
    assert a["final_test_accuracy"] is not None
    assert a["final_test_accuracy"] == b["final_test_accuracy"]
    assert a["model_digest"] == b["model_digest"]
    assert len(_leak_log(tmp_path / "a")) == 6


def test_flwr_run_writes_the_same_leak_log(tmp_path: Path, flwr_home: Path) -> None:
    # Prepare: a private home and free ports, so no other SuperLink is reused
    env = _flower_env(
        flwr_home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
    )
    out = tmp_path / "runs"
    # Execute
    done = _flwr_run(
        ["--federation-config", "num-supernodes=2"],
        f"num-server-rounds=1 run-name='flwr-e2e' out-dir='{out}'",
        cwd=tmp_path,
        env=env,
    )
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = _leak_log(out / "flwr-e2e")
    assert len(lines) == 2 and {x["server_round"] for x in lines} == {1}
    assert all(x["status"] in ("leaked", "failed") for x in lines)


def test_deployment_engine_on_loopback(tmp_path: Path, flwr_home: Path) -> None:
    # Prepare: one SuperLink and two SuperNodes on loopback, each in its own session
    env = _flower_env(flwr_home)
    link = _free_port()
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        'default = "local"\n\n'
        "[superlink.local]\n"
        'address = ":local:"\n\n'
        "[superlink.loopback]\n"
        f'address = "127.0.0.1:{link}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )
    out = tmp_path / "runs"
    started: list[subprocess.Popen] = []

    def start(*command: str, log: str) -> subprocess.Popen:
        handle = (tmp_path / log).open("w")
        proc = subprocess.Popen(
            [str(BIN / command[0]), *command[1:]],
            cwd=tmp_path,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    try:
        start(
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
            log="superlink.log",
        )  # fmt: skip
        _wait_for_port(link)
        for partition in (0, 1):
            start(
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f"partition-id={partition} num-partitions=2",
                log=f"supernode-{partition}.log",
            )  # fmt: skip
        # Execute
        done = _flwr_run(
            ["loopback"],
            f"num-server-rounds=1 run-name='deployed' out-dir='{out}'",
            cwd=tmp_path,
            env=env,
        )
    finally:
        # SuperNodes first (they retry forever), then the SuperLink: each by its group id
        for proc in [*started[1:], *started[:1]]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = _leak_log(out / "deployed")
    assert len(lines) == 2
    assert sorted(x["partition_id"] for x in lines) == [0, 1]
    assert all(x["psnr"] is not None for x in lines)
