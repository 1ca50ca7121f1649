"""The single-sample detector on real clients' updates, derived as the server derives them.

Each update is what an honest client of a seed scenario sends (``train_step`` in float32,
FedAvg between rounds), turned into a gradient as ``(global - update) / lr`` in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fl_attack.config import load_scenario
from fl_attack.engine import (
    SolveOptions,
    Verdict,
    gather_evidence,
    reconstruct,
    single_sample_gradients,
)
from fl_attack.engine.evidence import isotropic_spread
from fl_attack.metrics import image_metrics
from fl_attack.models import build_model
from fl_attack.simulation import (
    build_scenario_model,
    client_partition,
    load_federated_data,
    pick_batch,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
FLOAT32 = SolveOptions.for_dtype(torch.float32)
GOOD_DB = 40.0


def _client_updates(
    scenario: str,
    *,
    rounds: int,
    batch_size: int = 1,
    local_steps: int = 1,
    init: str | None = None,
    gradient_noise: float = 0.0,
) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]]:
    """(model as broadcast, derived float64 gradients, the images used) per client-round."""
    overrides: dict[str, int | str] = {
        "client.batch-size": batch_size,
        "client.local-steps": local_steps,
    }
    if init is not None:
        overrides["model.init"] = init
    sc = load_scenario(REPO / "scenarios" / scenario, overrides)
    fed = load_federated_data(sc.data)
    model = build_scenario_model(sc.model, fed)
    lr, n = sc.client.lr, sc.data.num_clients
    noise = torch.Generator().manual_seed(0)
    for server_round in range(1, rounds + 1):
        broadcast = {k: v.detach().clone() for k, v in model.state_dict().items()}
        replies = []
        for pid in range(n):
            part = client_partition(
                fed, sc.data, seed=sc.run.seed, partition_id=pid, num_partitions=n,
                min_size=batch_size,
            )  # fmt: skip
            batch = pick_batch(
                part, seed=sc.run.seed, server_round=server_round, partition_id=pid,
                batch_size=batch_size,
            )  # fmt: skip
            client = copy.deepcopy(model)
            train_step(client, fed.images[batch], fed.labels[batch], lr=lr, local_steps=local_steps)
            reply = client.state_dict()
            replies.append(reply)
            grads = {
                name: (broadcast[name].double() - reply[name].double()) / lr
                for name, _ in model.named_parameters()
            }
            if gradient_noise:
                grads = {
                    k: g + torch.randn(g.shape, generator=noise, dtype=g.dtype) * gradient_noise
                    for k, g in grads.items()
                }
            yield model, grads, fed.images[batch]
        with torch.no_grad():
            model.load_state_dict({k: sum(r[k] for r in replies) / n for k in broadcast})


def _verdict_only(
    model: torch.nn.Module, grads: dict[str, torch.Tensor], images: torch.Tensor
) -> Verdict:
    """The verdict without running the engine (it reads the gradients, not the image)."""
    bias = grads["classifier.bias"]
    image = torch.zeros_like(images[0])
    evidence = gather_evidence(model, grads, image, int(bias.argmin()), (), FLOAT32)
    return evidence.verdict


@pytest.mark.parametrize(
    ("scenario", "rounds"), [("default.toml", 3), ("cifar10.toml", 2)], ids=["faces", "cifar10"]
)
def test_no_false_alarm_on_clean_float32_updates(
    scenario: str, rounds: int, shared_datasets: Path
) -> None:
    # Prepare / Execute: every client-round of the seed scenario through the engine
    verdicts: list[tuple[float, Verdict]] = []
    for model, grads, images in _client_updates(scenario, rounds=rounds):
        if not bool(grads["classifier.bias"].any()):
            continue  # a saturated loss: no update at all, the engine refuses it
        result = reconstruct(model, grads, tuple(images.shape[1:]), options=FLOAT32)
        assert result.evidence is not None
        psnr = image_metrics(images[0], result.image).psnr
        verdicts.append((psnr, result.evidence.verdict))

    # Assert: every real leak is called a leak, and there are plenty of them
    leaks = [v for p, v in verdicts if p >= GOOD_DB]
    assert len(leaks) >= len(verdicts) // 2
    assert all(v is Verdict.LEAK for v in leaks), verdicts
    if scenario == "default.toml":  # faces: every client-round leaks, none is flagged
        assert [v for _, v in verdicts] == [Verdict.LEAK] * len(verdicts)


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_batches_are_not_single_sample(batch_size: int, shared_datasets: Path) -> None:
    verdicts = [
        _verdict_only(model, grads, images)
        for model, grads, images in _client_updates("cifar10.toml", rounds=1, batch_size=batch_size)
    ]
    assert verdicts == [Verdict.NOT_SINGLE_SAMPLE] * len(verdicts)


@pytest.mark.parametrize("local_steps", [2, 5])
def test_local_steps_are_not_single_sample(local_steps: int, shared_datasets: Path) -> None:
    # PyTorch's initialisation: no client's loss saturates after its first step (with the
    # seed's U(-0.5, 0.5) some do, and their later steps add exactly nothing)
    verdicts = [
        _verdict_only(model, grads, images)
        for model, grads, images in _client_updates(
            "cifar10.toml", rounds=2, local_steps=local_steps, init="default"
        )
    ]
    assert verdicts == [Verdict.NOT_SINGLE_SAMPLE] * len(verdicts)


@pytest.mark.parametrize("sigma", [1e-4, 1e-3, 1e-2])
def test_noised_gradients_are_detected(sigma: float, shared_datasets: Path) -> None:
    verdicts = [
        _verdict_only(model, grads, images)
        for model, grads, images in _client_updates("cifar10.toml", rounds=1, gradient_noise=sigma)
    ]
    assert verdicts == [Verdict.NOISE_DETECTED] * len(verdicts)


def test_evidence_numbers_of_an_exact_float64_gradient(seed: int) -> None:
    # Prepare
    model = build_model("rconv-main", activation="ReLU", num_classes=10, seed=3)
    x = torch.rand(3, 32, 32, dtype=torch.float64)
    grads = single_sample_gradients(model, x, 4, dtype=torch.float64)

    # Execute
    result = reconstruct(model, grads, (3, 32, 32))

    # Assert
    evidence = result.evidence
    assert evidence is not None
    assert evidence.verdict is Verdict.LEAK
    assert evidence.is_leak
    assert evidence.tolerance == pytest.approx(math.sqrt(torch.finfo(torch.float64).eps))
    assert evidence.rank_one_residual < evidence.tolerance
    assert evidence.softmax_residual < evidence.tolerance
    assert evidence.negative_bias_entries == 1
    assert evidence.reasons == ()


def test_two_samples_give_their_reasons(seed: int) -> None:
    model = build_model("rconv-main", activation="ReLU", num_classes=10, seed=3)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    one = single_sample_gradients(model, x[0], 1, dtype=torch.float64)
    two = single_sample_gradients(model, x[1], 7, dtype=torch.float64)
    grads = {k: (one[k] + two[k]) / 2 for k in one}
    evidence = gather_evidence(model, grads, x[0], 1, (), SolveOptions.for_dtype(torch.float64))
    assert evidence.verdict is Verdict.NOT_SINGLE_SAMPLE
    assert evidence.negative_bias_entries == 2
    assert any("rank one" in r for r in evidence.reasons)
    assert any("negative bias-gradient entries" in r for r in evidence.reasons)


def test_isotropic_spread_is_half_the_marchenko_pastur_ratio(seed: int) -> None:
    assert isotropic_spread(9, 9) == 0.0
    assert isotropic_spread(9, 900) == pytest.approx((1 - 0.1) / (1 + 0.1) / 2)
    noise = torch.randn(9, 900, dtype=torch.float64)
    s = torch.linalg.svdvals(noise)
    assert float(s[-1] / s[0]) > isotropic_spread(9, 900)
