"""``fl-attack sweep``: a tiny grid of real runs on the embedded faces; plot == sweep.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fl_attack.cli import main
from fl_attack.commands.sweep import (
    CROSSING_DB,
    SWEEP_FILE,
    SWEEP_PLOT,
    PointResult,
    SweepResult,
    crossing,
    sweep,
    sweep_figure,
)
from fl_attack.config import load_scenario

TINY = """
[run]
name = "tiny-sweep"
rounds = 1
seed = 0
out-dir = "{out}"

[data]
dataset = "faces"
num-clients = 2
partitioning = "iid"
test-fraction = 0.2

[model]
name = "rconv-main"
activation = "ReLU"
init = "uniform"
seed = 14
num-classes = 10

[client]
batch-size = 1
local-steps = 1
lr = 0.013

[server]
min-clients = 2
fraction-train = 1.0

[attack]
enabled = true
threat-model = "honest-but-curious"

[defense]
kind = "gaussian"

[sweep]
axis = "defense.scale"
values = [0.0, 0.01]
seeds = [0]
"""


def _point(value: float, psnr: float | None, accuracy: float | None) -> PointResult:
    return PointResult(
        value=value,
        value2=math.nan,
        runs=1,
        psnr_mean=psnr,
        psnr_std=0.0,
        ssim_mean=None,
        ssim_std=None,
        accuracy_mean=accuracy,
        accuracy_std=0.0,
        flagged_fraction=None,
        clean_leaks=0,
        epsilon=None,
    )


def test_crossing_interpolates_strength_and_accuracy() -> None:
    points = [_point(0.0, 90.0, 0.5), _point(1.0, 40.0, 0.4), _point(3.0, 0.0, 0.1)]
    found = crossing(points)
    assert found is not None
    assert found.between == (1.0, 3.0)
    # 40 -> 0 dB over 1 -> 3: 20 dB halfway, at 2.0; accuracy halfway, 0.25
    assert found.value == pytest.approx(2.0)
    assert found.accuracy == pytest.approx(0.25)
    assert crossing([_point(0.0, 90.0, 0.5), _point(1.0, 30.0, 0.4)]) is None
    assert CROSSING_DB == 20.0


@pytest.mark.e2e
def test_tiny_sweep_writes_json_plot_and_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY.format(out=tmp_path / "runs"), encoding="utf-8")

    # Execute
    code = main(["sweep", str(scenario)])

    # Assert: files, table, and the undefended point leaking while the noised one does not
    out = tmp_path / "runs" / "tiny-sweep"
    assert code == 0
    assert (out / SWEEP_PLOT).stat().st_size > 0
    saved = json.loads((out / SWEEP_FILE).read_text(encoding="utf-8"))
    assert [p["value"] for p in saved["points"]] == [0.0, 0.01]
    assert len(saved["runs"]) == 2
    clean, noised = saved["points"]
    assert clean["psnr_mean"] > CROSSING_DB > noised["psnr_mean"]
    assert noised["flagged_fraction"] == 1.0
    assert clean["clean_leaks"] == 2
    assert saved["crossing"][""]["between"] == [0.0, 0.01]
    printed = capsys.readouterr().out
    assert "crosses 20 dB" in printed
    assert "sweep.json" in printed


@pytest.mark.e2e
def test_plotted_numbers_are_those_of_sweep_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        TINY.format(out=tmp_path / "runs").replace("values = [0.0, 0.01]", "values = [0.0]"),
        encoding="utf-8",
    )

    # Execute
    result = sweep(load_scenario(scenario))
    figure = sweep_figure(result)

    # Assert: each panel's line carries exactly the means written to sweep.json
    saved = json.loads((tmp_path / "runs" / "tiny-sweep" / SWEEP_FILE).read_text("utf-8"))
    assert isinstance(result, SweepResult)
    for ax, field in zip(figure.axes, ("psnr", "ssim", "accuracy"), strict=True):
        line = ax.lines[0]
        assert list(line.get_xdata()) == [p["value"] for p in saved["points"]]
        assert list(line.get_ydata()) == [p[f"{field}_mean"] for p in saved["points"]]


def test_sweep_without_a_sweep_table_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sweep", str(Path(__file__).resolve().parents[2] / "scenarios/default.toml")])
    assert code == 2
    assert "no [sweep] table" in capsys.readouterr().err
