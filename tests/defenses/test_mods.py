"""Client mods: each one's reply checked against the transform computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from fl_attack.config import DefenseConfig, DefenseKind
from fl_attack.defenses import (
    ClipNoiseMod,
    NoiseMod,
    QuantizeMod,
    TopKMod,
    clip_by_norm,
    defense_epsilon,
    gaussian_epsilon,
    gaussian_noise,
    laplace_noise,
    make_defense_mod,
    quantize,
    top_k,
)
from fl_attack.defenses.mods import noise_generator

NODE_ID = 7
ROUND = 3
PARTITION = 2
SEED = 11


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    """Messages can be built."""


def _make_arrays(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """A small float32 model's arrays."""
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((4, 6)) * scale).astype(np.float32),
        "b": (rng.standard_normal(4) * scale).astype(np.float32),
    }


def _make_context(partition_id: int = PARTITION) -> Context:
    """A node context with its partition."""
    return Context(
        run_id=1,
        node_id=NODE_ID,
        node_config={"partition-id": partition_id, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _make_train_message(arrays: dict[str, np.ndarray]) -> Message:
    """A train message as FedAvg sends it."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"lr": 0.01, "server-round": ROUND}),
        }
    )
    return Message(content=content, dst_node_id=NODE_ID, message_type=MessageType.TRAIN)


def _make_trainer(trained: dict[str, np.ndarray]):
    """A ``call_next`` that replies with ``trained`` as the client's new weights."""

    def call_next(msg: Message, ctxt: Context) -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in trained.items()})}
        )
        return Message(content=content, reply_to=msg)

    return call_next


def _sent(reply: Message) -> dict[str, np.ndarray]:
    record = reply.content["arrays"]
    return {k: record[k].numpy() for k in record}


def _expected(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], transform
) -> dict[str, np.ndarray]:
    """``global + transform(update)`` in float64, rounded to the reply's float32."""
    update = {
        k: torch.from_numpy(after[k].astype(np.float64) - before[k].astype(np.float64))
        for k in before
    }
    new = transform(update)
    return {k: (before[k].astype(np.float64) + new[k].numpy()).astype(np.float32) for k in before}


def _run(mod, before, after, partition_id: int = PARTITION) -> Message:
    return mod(_make_train_message(before), _make_context(partition_id), _make_trainer(after))


def _assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    bad = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not bad, {k: float(np.abs(got[k] - want[k]).max()) for k in bad}


@pytest.fixture
def weights() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Global arrays and the arrays after a small local step."""
    before = _make_arrays()
    step = _make_arrays(scale=1e-2, seed=1)
    after = {k: (before[k] - step[k]).astype(np.float32) for k in before}
    return before, after


@pytest.mark.parametrize("relative", [False, True])
def test_gaussian_noise_mod_matches_the_transform(weights, relative: bool) -> None:
    # Prepare
    before, after = weights
    mod = NoiseMod("gaussian", 1e-3, relative=relative, seed=SEED)

    # Execute
    reply = _run(mod, before, after)

    # Assert
    want = _expected(
        before,
        after,
        lambda u: gaussian_noise(
            u, 1e-3, relative=relative, generator=noise_generator(SEED, ROUND, PARTITION)
        ),
    )
    _assert_equal(_sent(reply), want)
    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == list(before)


def test_laplace_noise_mod_matches_the_transform(weights) -> None:
    before, after = weights
    reply = _run(NoiseMod("laplace", 2e-3, seed=SEED), before, after)
    want = _expected(
        before,
        after,
        lambda u: laplace_noise(u, 2e-3, generator=noise_generator(SEED, ROUND, PARTITION)),
    )
    _assert_equal(_sent(reply), want)


def test_noise_differs_between_clients_and_repeats_for_one(weights) -> None:
    before, after = weights
    mod = NoiseMod("gaussian", 1e-3, seed=SEED)
    first, again = _sent(_run(mod, before, after)), _sent(_run(mod, before, after))
    other = _sent(_run(mod, before, after, partition_id=PARTITION + 1))
    _assert_equal(again, first)
    assert not np.array_equal(other["w"], first["w"])


def test_clip_noise_mod_clips_to_the_norm_then_adds_noise(weights) -> None:
    # Prepare: a clip far below the update's norm, so clipping is active
    before, after = weights
    update = {k: after[k].astype(np.float64) - before[k].astype(np.float64) for k in before}
    norm = math.sqrt(sum(float(np.square(u).sum()) for u in update.values()))
    clip = norm / 4
    mod = ClipNoiseMod(clip, 0.5, delta=1e-5, seed=SEED)

    # Execute
    reply = _run(mod, before, after)

    # Assert: clip by hand (factor clip / norm), then the seeded noise of std 0.5 * clip
    noise_gen = noise_generator(SEED, ROUND, PARTITION)

    def by_hand(u):
        clipped = {k: t * (clip / norm) for k, t in u.items()}
        return gaussian_noise(clipped, 0.5 * clip, generator=noise_gen)

    _assert_equal(_sent(reply), _expected(before, after, by_hand))
    assert mod.epsilon == pytest.approx(gaussian_epsilon(0.5, 1e-5))


def test_clip_without_noise_bounds_the_sent_update(weights) -> None:
    before, after = weights
    reply = _run(ClipNoiseMod(1e-3, 0.0, seed=SEED), before, after)
    sent = _sent(reply)
    norm = math.sqrt(
        sum(float(np.square(sent[k].astype(np.float64) - before[k]).sum()) for k in before)
    )
    assert norm == pytest.approx(1e-3, rel=1e-3)
    _assert_equal(sent, _expected(before, after, lambda u: clip_by_norm(u, 1e-3)))


def test_top_k_mod_keeps_the_largest_entries(weights) -> None:
    before, after = weights
    reply = _run(TopKMod(0.25), before, after)
    _assert_equal(_sent(reply), _expected(before, after, lambda u: top_k(u, 0.25)))
    sent_update = _sent(reply)["w"].astype(np.float64) - before["w"]
    assert int((np.abs(sent_update) > 0).sum()) == math.ceil(0.25 * before["w"].size)


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_quantize_mod_rounds_the_update(weights, fmt: str) -> None:
    before, after = weights
    reply = _run(QuantizeMod(fmt), before, after)
    _assert_equal(_sent(reply), _expected(before, after, lambda u: quantize(u, fmt)))


def test_mod_returns_a_precondition_error_without_one_array_record(weights) -> None:
    before, after = weights
    msg = _make_train_message(before)
    msg.content["extra"] = ArrayRecord({"x": torch.zeros(2)})
    called = []

    def call_next(m: Message, c: Context) -> Message:
        called.append(m)
        return _make_trainer(after)(m, c)

    reply = TopKMod(0.5)(msg, _make_context(), call_next)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "TopKMod" in reply.error.reason
    assert not called


def test_mod_reports_a_reply_with_other_arrays(weights) -> None:
    before, after = weights
    renamed = {f"{k}_x": v for k, v in after.items()}
    reply = _run(QuantizeMod("fp16"), before, renamed)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "QuantizeMod" in reply.error.reason


def test_mod_passes_a_client_error_through(weights) -> None:
    before, _ = weights

    def failing(msg: Message, ctxt: Context) -> Message:
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=msg
        )

    reply = NoiseMod("gaussian", 1.0)(_make_train_message(before), _make_context(), failing)
    assert reply.has_error()
    assert reply.error.reason == "boom"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NoiseMod("uniform", 1.0), "kind"),
        (lambda: NoiseMod("gaussian", -1.0), "scale"),
        (lambda: ClipNoiseMod(0.0, 1.0), "clip_norm"),
        (lambda: ClipNoiseMod(1.0, -1.0), "noise_multiplier"),
        (lambda: ClipNoiseMod(1.0, 1.0, delta=1.0), "delta"),
        (lambda: TopKMod(0.0), "fraction"),
        (lambda: QuantizeMod("int4"), "fmt"),
        (lambda: NoiseMod("gaussian", 1.0, seed=-1), "seed"),
    ],
)
def test_mod_parameters_are_validated(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_make_defense_mod_follows_the_defense_table() -> None:
    assert make_defense_mod(DefenseConfig()) is None
    noise = make_defense_mod(DefenseConfig(kind=DefenseKind.LAPLACE, scale=0.1, relative=True))
    assert isinstance(noise, NoiseMod)
    assert (noise.kind, noise.scale, noise.relative) == ("laplace", 0.1, True)
    clip = make_defense_mod(
        DefenseConfig(kind=DefenseKind.CLIP_GAUSSIAN, clip_norm=2.0, noise_multiplier=1.1)
    )
    assert isinstance(clip, ClipNoiseMod)
    assert (clip.clip_norm, clip.noise_multiplier) == (2.0, 1.1)
    assert isinstance(
        make_defense_mod(DefenseConfig(kind=DefenseKind.TOP_K, fraction=0.1)), TopKMod
    )
    quant = make_defense_mod(DefenseConfig(kind=DefenseKind.QUANTIZE, format="int8"))
    assert isinstance(quant, QuantizeMod)
    assert quant.fmt == "int8"


def test_defense_epsilon_only_for_clip_gaussian() -> None:
    assert defense_epsilon(DefenseConfig(kind=DefenseKind.GAUSSIAN, scale=1.0)) is None
    eps, delta = defense_epsilon(
        DefenseConfig(kind=DefenseKind.CLIP_GAUSSIAN, clip_norm=1.0, noise_multiplier=2.0)
    )
    assert delta == 1e-5
    assert eps == pytest.approx(gaussian_epsilon(2.0, 1e-5))
    assert 0 < eps < math.inf
