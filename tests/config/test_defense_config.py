"""The ``[defense]``, ``[sweep]`` and server-side DP keys of a scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_attack.config import DefenseKind, ScenarioError, load_scenario

REPO = Path(__file__).resolve().parents[2]
DEFAULT = (REPO / "scenarios" / "default.toml").read_text(encoding="utf-8")


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(DEFAULT + "\n" + extra, encoding="utf-8")
    return path


def test_no_defense_table_means_no_defense_and_no_sweep() -> None:
    cfg = load_scenario(REPO / "scenarios" / "default.toml")
    assert cfg.defense.kind is DefenseKind.NONE
    assert cfg.sweep is None
    assert cfg.server.dp_clip_norm is None


def test_defense_table_is_parsed(tmp_path: Path) -> None:
    cfg = load_scenario(
        _write(
            tmp_path,
            '[defense]\nkind = "clip-gaussian"\nclip-norm = 2\nnoise-multiplier = 1.5\n'
            "delta = 1e-6\n",
        )
    )
    assert cfg.defense.kind is DefenseKind.CLIP_GAUSSIAN
    assert (cfg.defense.clip_norm, cfg.defense.noise_multiplier, cfg.defense.delta) == (
        2.0,
        1.5,
        1e-6,
    )


def test_defense_keys_can_be_overridden(tmp_path: Path) -> None:
    cfg = load_scenario(
        _write(tmp_path, '[defense]\nkind = "gaussian"\n'),
        {"defense.scale": 0.25, "defense.relative": True},
    )
    assert (cfg.defense.scale, cfg.defense.relative) == (0.25, True)


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ('[defense]\nkind = "blur"\n', "kind", "one of none, gaussian"),
        ('[defense]\nkind = "gaussian"\nscale = -1.0\n', "scale", "a float >= 0"),
        ('[defense]\nkind = "clip-gaussian"\n', "clip-norm", "needs clip-norm"),
        ('[defense]\nkind = "top-k"\nfraction = 0.0\n', "fraction", "(0, 1]"),
        ('[defense]\nkind = "quantize"\nformat = "int4"\n', "format", "fp16, int8"),
        ("[defense]\ndelta = 1.0\n", "delta", "(0, 1)"),
        ("[defense]\nsigma = 1.0\n", "sigma", "unknown key"),
    ],
)
def test_bad_defense_keys_name_table_and_key(
    tmp_path: Path, extra: str, key: str, words: str
) -> None:
    with pytest.raises(ScenarioError, match=r"\[defense\]") as info:
        load_scenario(_write(tmp_path, extra))
    assert info.value.table == "defense"
    assert info.value.key == key
    assert words in str(info.value)


def test_server_side_dp_keys(tmp_path: Path) -> None:
    text = DEFAULT.replace(
        "fraction-train = 1.0",
        "fraction-train = 1.0\ndp-clip-norm = 0.5\ndp-noise-multiplier = 0.1",
    )
    path = tmp_path / "dp.toml"
    path.write_text(text, encoding="utf-8")
    cfg = load_scenario(path)
    assert (cfg.server.dp_clip_norm, cfg.server.dp_noise_multiplier) == (0.5, 0.1)
    path.write_text(text.replace("dp-clip-norm = 0.5", "dp-clip-norm = 0"), encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"dp-clip-norm = 0\.0 is invalid"):
        load_scenario(path)


def test_sweep_table_is_parsed(tmp_path: Path) -> None:
    cfg = load_scenario(
        _write(
            tmp_path,
            '[sweep]\naxis = "client.batch-size"\nvalues = [1, 2]\nseeds = [0, 1]\n'
            'axis2 = "client.local-steps"\nvalues2 = [1, 3]\n',
        )
    )
    assert cfg.sweep is not None
    assert (cfg.sweep.axis, cfg.sweep.values, cfg.sweep.seeds) == (
        "client.batch-size",
        (1, 2),
        (0, 1),
    )
    assert (cfg.sweep.axis2, cfg.sweep.values2) == ("client.local-steps", (1, 3))


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ('[sweep]\naxis = "run.name"\nvalues = [1]\nseeds = [0]\n', "axis", "numeric"),
        ('[sweep]\naxis = "defense.scale"\nvalues = []\nseeds = [0]\n', "values", "non-empty"),
        ('[sweep]\naxis = "defense.scale"\nvalues = [1]\nseeds = [-1]\n', "seeds", "ints >= 0"),
        (
            '[sweep]\naxis = "defense.scale"\nvalues = [1]\nseeds = [0]\naxis2 = "client.lr"\n',
            "values2",
            "go together",
        ),
    ],
)
def test_bad_sweep_keys_name_table_and_key(
    tmp_path: Path, extra: str, key: str, words: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(_write(tmp_path, extra))
    assert info.value.table == "sweep"
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "defense-noise.toml",
        "defense-clip-noise.toml",
        "defense-topk.toml",
        "defense-batch.toml",
        "defense-local-steps.toml",
        "defense-server-dp.toml",
    ],
)
def test_shipped_defense_scenarios_parse(name: str, shared_datasets: Path) -> None:
    cfg = load_scenario(REPO / "scenarios" / name)
    assert cfg.sweep is not None or cfg.server.dp_clip_norm is not None
