"""Bad scenario files: one line naming the table, the key, the value and the fix; exit code 2."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT = (REPO / "scenarios" / "default.toml").read_text(encoding="utf-8")
CIFAR10 = (REPO / "scenarios" / "cifar10.toml").read_text(encoding="utf-8")


def _set(text: str, key: str, value: str) -> str:
    """``text`` with ``key = ...`` replaced by ``key = value`` (the key must exist once)."""
    pattern = re.compile(rf"^{re.escape(key)} = [^\n#]*", re.MULTILINE)
    assert len(pattern.findall(text)) == 1, key
    return pattern.sub(f"{key} = {value}", text)


def _drop_line(text: str, key: str) -> str:
    pattern = re.compile(rf"^{re.escape(key)} = [^\n]*\n", re.MULTILINE)
    assert len(pattern.findall(text)) == 1, key
    return pattern.sub("", text)


def _drop_table(text: str, table: str) -> str:
    head, _, tail = text.partition(f"[{table}]\n")
    assert tail, table
    rest = tail.split("\n[", 1)
    return head + ("[" + rest[1] if len(rest) == 2 else "")


# (case id, scenario text, fragments the message must hold)
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "unknown-key",
        _set(DEFAULT, "rounds", "3\nrouns = 4"),
        ("unknown key [run] rouns", "allowed keys in [run]", "correct its spelling"),
    ),
    (
        "unknown-table",
        DEFAULT + "\n[extras]\nx = 1\n",
        ("unknown table [extras]", "allowed tables", "[attack]"),
    ),
    ("missing-key", _drop_line(DEFAULT, "rounds"), ("missing key [run] rounds", "add `rounds")),
    ("missing-table", _drop_table(DEFAULT, "attack"), ("missing table [attack]", "enabled")),
    (
        "table-is-a-value",
        "data = 5\n" + _drop_table(DEFAULT, "data"),
        ("data = 5 must be a table [data]",),
    ),
    ("int-is-a-string", _set(DEFAULT, "rounds", '"three"'), ("[run] rounds = 'three'", "int >= 1")),
    ("int-is-a-float", _set(DEFAULT, "num-clients", "2.5"), ("[data] num-clients = 2.5",)),
    ("bool-is-a-string", _set(DEFAULT, "enabled", '"yes"'), ("[attack] enabled", "true or false")),
    ("zero-rounds", _set(DEFAULT, "rounds", "0"), ("[run] rounds = 0", "an int >= 1")),
    (
        "negative-model-seed",
        DEFAULT.replace("seed = 14", "seed = -3"),
        ("[model] seed = -3", "an int >= 0"),
    ),
    ("zero-lr", _set(DEFAULT, "lr", "0"), ("[client] lr = 0.0", "a float > 0")),
    ("negative-lr", _set(DEFAULT, "lr", "-0.1"), ("[client] lr = -0.1", "a float > 0")),
    ("nan-lr", _set(DEFAULT, "lr", "nan"), ("[client] lr = nan", "a float > 0")),
    ("zero-batch", _set(DEFAULT, "batch-size", "0"), ("[client] batch-size = 0",)),
    ("full-test-fraction", _set(DEFAULT, "test-fraction", "1.0"), ("[data] test-fraction = 1.0",)),
    (
        "zero-fraction-train",
        _set(DEFAULT, "fraction-train", "0.0"),
        ("[server] fraction-train = 0.0", "(0, 1]"),
    ),
    (
        "min-clients-above-clients",
        _set(DEFAULT, "min-clients", "9"),
        ("[server] min-clients = 9", "exceeds [data] num-clients = 8", "wait forever"),
    ),
    (
        "zero-round-timeout",
        _set(DEFAULT, "fraction-train", "1.0\nround-timeout = 0"),
        ("[server] round-timeout = 0.0", "seconds > 0"),
    ),
    (
        "unknown-dataset",
        _set(DEFAULT, "dataset", '"imagenet"'),
        ("[data] dataset = 'imagenet'", "faces, MNIST, CIFAR10, CIFAR100"),
    ),
    (
        "unknown-partitioning",
        _set(DEFAULT, "partitioning", '"by-hand"'),
        ("[data] partitioning = 'by-hand'", "iid, dirichlet"),
    ),
    (
        "negative-dirichlet-alpha",
        _set(DEFAULT, "partitioning", '"dirichlet"\ndirichlet-alpha = -1'),
        ("[data] dirichlet-alpha = -1.0", "a float > 0"),
    ),
    ("zero-limit", _set(DEFAULT, "test-fraction", "0.2\nlimit = 0"), ("[data] limit = 0",)),
    (
        "unknown-model",
        DEFAULT.replace('name = "rconv-main"', 'name = "resnet"'),
        ("[model] name = 'resnet'", "rconv-main"),
    ),
    ("unknown-activation", _set(DEFAULT, "activation", '"GELU"'), ("[model] activation = 'GELU'",)),
    ("unknown-init", _set(DEFAULT, "init", '"xavier"'), ("[model] init = 'xavier'", "uniform")),
    ("one-class", _set(DEFAULT, "num-classes", "1"), ("[model] num-classes = 1", "an int >= 2")),
    (
        "run-name-with-a-slash",
        DEFAULT.replace('name = "default"', 'name = "../escape"'),
        ("[run] name = '../escape'", "without '/'"),
    ),
    (
        "unknown-threat-model",
        _set(DEFAULT, "threat-model", '"evil"'),
        ("[attack] threat-model = 'evil'", "honest-but-curious"),
    ),
    ("not-toml", DEFAULT.replace("[run]", "[run"), ("not valid TOML", "fix the syntax")),
    (
        "missing-data-folder",
        _set(CIFAR10, "num-clients", "4\ndata-dir = '/nonexistent/fl-attack-data'"),
        ("[data] data-dir = '/nonexistent/fl-attack-data'", "is not a folder", "--data-dir"),
    ),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_scenario_is_one_line_and_exit_code_2(
    text: str,
    fragments: tuple[str, ...],
    tmp_path: Path,
    user_error: Callable[..., str],
) -> None:
    # Prepare
    path = tmp_path / "scenario.toml"
    path.write_text(text, encoding="utf-8")
    # Execute / Assert: the file is named, and nothing ran
    err = user_error(("run", str(path), "--out-dir", str(tmp_path / "runs")), *fragments)
    assert "scenario.toml" in err
    assert not (tmp_path / "runs").exists()


def test_a_missing_scenario_file(tmp_path: Path, user_error: Callable[..., str]) -> None:
    user_error(("run", str(tmp_path / "nope.toml")), "no such file", "scenarios/default.toml")


def test_a_scenario_that_is_not_utf8(tmp_path: Path, user_error: Callable[..., str]) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(DEFAULT.replace('"default"', '"d\u00e9faut"').encode("latin-1"))
    user_error(("run", str(path)), "not valid TOML")


def test_an_unset_data_folder_names_the_environment_variable(
    tmp_path: Path, user_error: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the variable points at nothing; the scenario sets no data-dir
    monkeypatch.setenv("FL_ATTACK_DATA_DIR", str(tmp_path / "gone"))
    path = tmp_path / "cifar10.toml"
    path.write_text(CIFAR10, encoding="utf-8")
    # Execute / Assert
    user_error(("run", str(path)), "[data] data-dir is unset", "$FL_ATTACK_DATA_DIR", "gone")
