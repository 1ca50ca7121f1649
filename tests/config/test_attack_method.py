"""``[attack] method`` and ``dlg-iterations``: the registry's names, checked like every key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_attack.attacks import ATTACKS
from fl_attack.config import ScenarioError, load_scenario

DEFAULT = Path(__file__).resolve().parents[2] / "scenarios" / "default.toml"


def test_method_defaults_to_rconv() -> None:
    cfg = load_scenario(DEFAULT)
    assert cfg.attack.method == "rconv"
    assert cfg.attack.dlg_iterations >= 1


def test_method_and_iterations_are_read() -> None:
    cfg = load_scenario(DEFAULT, {"attack.method": "dlg", "attack.dlg-iterations": 7})
    assert cfg.attack.method == "dlg" and cfg.attack.dlg_iterations == 7


def test_unknown_method_lists_the_registered_attacks() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(DEFAULT, {"attack.method": "gradinversion"})
    message = str(info.value)
    assert "[attack] method = 'gradinversion'" in message
    assert all(name in message for name in ATTACKS)
    assert info.value.table == "attack" and info.value.key == "method"


def test_dlg_iterations_must_be_positive() -> None:
    with pytest.raises(ScenarioError, match="dlg-iterations = 0"):
        load_scenario(DEFAULT, {"attack.dlg-iterations": 0})


def test_workers_default_to_one_per_core_and_are_read() -> None:
    assert load_scenario(DEFAULT).attack.workers == 0
    assert load_scenario(DEFAULT, {"attack.workers": 3}).attack.workers == 3


def test_negative_workers_are_refused() -> None:
    with pytest.raises(ScenarioError, match="workers = -1"):
        load_scenario(DEFAULT, {"attack.workers": -1})
