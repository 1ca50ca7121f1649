"""``fl-attack reconstruct``: the reference's flags, its artefacts, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_attack.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_reference_example_recovers_image_92(
    shared_datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare / Execute
    code, out, _ = _run(
        capsys,
        "reconstruct",
        "-d",
        "CIFAR100",
        "-i",
        "92",
        "-a",
        "ReLU",
        "--data-dir",
        str(shared_datasets),
        "--out",
        str(tmp_path),
    )
    # Assert
    assert code == 0
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["psnr"] >= 60.0
    assert record["label_recovered"] == record["label_true"]
    assert record["dtype"] == "float32" and record["model"] == "rconv-main"
    assert (tmp_path / "reconstruction.png").stat().st_size > 1000
    assert "PSNR" in out and "per-layer diagnostics" in out


def test_faces_needs_no_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _run(
        capsys,
        "reconstruct",
        "-d",
        "faces",
        "-i",
        "3",
        "--dtype",
        "float64",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    assert json.loads((tmp_path / "result.json").read_text())["psnr"] >= 100.0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-d", "SVHN"], "unknown dataset"),
        (["-d", "faces", "-i", "999"], "out of range"),
        (["-d", "faces", "-i", "-1"], "out of range"),
        (["-d", "CIFAR10", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
        (["-d", "faces", "-a", "GELU"], "unknown activation 'GELU'"),
        (["-d", "faces", "--model", "resnet18"], "unknown model 'resnet18'"),
        (["-d", "faces", "--init", "xavier"], "unknown init 'xavier'"),
        (["-d", "faces", "--dtype", "float16"], "--dtype 'float16'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "reconstruct", *argv, "--out", str(tmp_path))
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_a_gradient_without_information_is_an_error_not_a_picture(
    shared_datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # o-cnn6 at seed 50 classifies CIFAR-10 image 0 with a margin so large that its float32
    # cross-entropy gradient is exactly zero: nothing leaks, and the CLI says so.
    code, _, err = _run(
        capsys,
        "reconstruct",
        "-d",
        "CIFAR10",
        "-i",
        "0",
        "--model",
        "o-cnn6",
        "--data-dir",
        str(shared_datasets),
        "--out",
        str(tmp_path),
    )
    assert code == 2
    assert "bias gradient is all zero" in err
    assert not (tmp_path / "result.json").exists()
