"""Safety: user text is shown as typed, nothing untrusted is unpickled, servers stay local."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from fl_attack.config import load_scenario
from server.server_app import run_server

REPO = Path(__file__).resolve().parents[2]
SOURCES = [
    p
    for folder in ("fl_attack", "server", "clients", "benchmarks", "tests")
    for p in sorted((REPO / folder).rglob("*.py"))
    if p.name != "test_safety.py"  # it spells the patterns out
]
PACKAGE = [p for p in SOURCES if p.parts[len(REPO.parts)] != "tests"]
MARKUP_NAME = "[bold red]x[red] $^_$"  # rich markup, and math matplotlib cannot parse


def test_rich_markup_in_a_bad_value_is_printed_literally(
    tmp_path: Path, user_error: Callable[..., str]
) -> None:
    # Prepare: an unknown key that looks like markup
    text = (REPO / "scenarios" / "default.toml").read_text()
    path = tmp_path / "markup.toml"
    path.write_text(text.replace("[run]\n", '[run]\n"[bold]oops[/bold]" = 1\n', 1))
    # Execute / Assert
    user_error(("run", str(path)), "unknown key [run] [bold]oops[/bold]")


def test_a_run_named_like_markup_is_reported_as_typed(tmp_path: Path, inline_grid: type) -> None:
    # Prepare
    scenario = load_scenario(
        REPO / "scenarios" / "default.toml",
        {
            "run.out-dir": str(tmp_path),
            "run.name": MARKUP_NAME,
            "run.rounds": 1,
            "data.num-clients": 2,
        },
    )
    console = Console(record=True, width=200, force_terminal=False)
    # Execute
    summary = run_server(inline_grid(scenario, 2), scenario, console=console)
    # Assert: the closing table shows the name as typed; the picture was drawn
    assert MARKUP_NAME in console.export_text()
    assert summary.name == MARKUP_NAME
    assert (scenario.run.run_dir / "round_1.png").stat().st_size > 0


def test_reconstruct_prints_an_output_path_as_typed(
    tmp_path: Path, cli: Callable[..., tuple[int, str, str]]
) -> None:
    out = tmp_path / "[bold]out"
    code, stdout, err = cli("reconstruct", "-d", "faces", "-i", "3", "--out", str(out))
    assert code == 0, err
    assert f"picture:{out / 'reconstruction.png'}" in "".join(stdout.split())  # may wrap
    assert (out / "reconstruction.png").is_file()


def test_no_source_unpickles_or_binds_every_interface() -> None:
    # Execute: every offending call in the sources
    offences = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(REPO))
        offences += [
            (where, call)
            for call in re.findall(r"torch\.load\([^)]*\)", text)
            if "weights_only=True" not in call
        ]
        offences += [(where, "pickle.load(") for _ in re.findall(r"pickle\.load\(", text)]
        offences += [(where, address) for address in re.findall(r"0\.0\.0\.0|\[::\]", text)]
        if path in PACKAGE:
            offences += [
                (where, call)
                for call in re.findall(r"np\.load\([^)]*\)", text)
                if "allow_pickle=False" not in call
            ]
    # Assert
    assert SOURCES and not offences, offences
