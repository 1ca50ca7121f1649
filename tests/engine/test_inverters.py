"""Oracle tests: every registered inverter against autograd on a known input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.engine import (
    INVERTERS,
    ReconstructionError,
    Signal,
    SolveOptions,
    assert_all_close,
    registered_types,
    trace,
)
from fl_attack.engine.inverters import conv2d
from fl_attack.engine.inverters.relu import zero_threshold
from fl_attack.engine.registry import inverter_for, register_inverter
from fl_attack.engine.shared import clear_weight_cache
from fl_attack.engine.solve import OrderedLU

F64 = SolveOptions.for_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _full_signal(value: torch.Tensor, grad: torch.Tensor) -> Signal:
    return Signal(value=value, known=torch.ones_like(value, dtype=torch.bool), grad=grad)


def test_registry_holds_the_seven_layer_types() -> None:
    # Prepare / Execute
    names = registered_types()
    # Assert
    assert names == sorted(["Conv2d", "Flatten", "LeakyReLU", "Linear", "ReLU", "Sigmoid", "Tanh"])


def test_registering_a_type_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already has an inverter"):
        register_inverter(nn.Linear)(type(INVERTERS[nn.Linear]))


def test_linear_inverter_recovers_input_and_input_gradient() -> None:
    # Prepare
    model = nn.Sequential(nn.Linear(20, 7)).double()
    x = torch.randn(20, dtype=torch.float64)
    truth = trace(model, x, 3)["0"]
    grads = {n: p for n, p in _grads(model, x, 3).items()}
    # Execute
    signal, diag = inverter_for(model[0]).invert(
        model[0], "0", {"weight": grads["0.weight"], "bias": grads["0.bias"]}, None, (20,), F64
    )
    # Assert
    assert_all_close(
        {"input": truth.input, "grad_input": truth.grad_input},
        {"input": signal.value, "grad_input": signal.grad},
        rtol=1e-10,
        atol=1e-12,
    )
    assert diag.rank == diag.unknowns == 20
    assert diag.relative_residual < 1e-12


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "filters", "shape"),
    [
        (5, 2, 2, 12, (3, 16, 16)),
        (3, 1, 1, 4, (2, 9, 7)),
        (5, 1, 2, 3, (4, 8, 8)),
        (3, 2, 0, 16, (3, 11, 13)),
        (4, 2, 1, 20, (1, 12, 10)),
    ],
)
@pytest.mark.parametrize("known_fraction", [1.0, 0.5, 0.0])
def test_conv2d_inverter_recovers_input(
    kernel: int,
    stride: int,
    padding: int,
    filters: int,
    shape: tuple[int, int, int],
    known_fraction: float,
) -> None:
    # Prepare: a conv layer inside a model, its true output and output gradient.
    conv = nn.Conv2d(shape[0], filters, kernel, stride=stride, padding=padding).double()
    probe = conv(torch.zeros(1, *shape, dtype=torch.float64))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(probe.numel(), 5)).double()
    x = torch.rand(shape, dtype=torch.float64)
    truth = trace(model, x, 1)["0"]
    known = torch.rand(truth.output.shape) < known_fraction
    grads = _grads(model, x, 1)
    # The oracle system, built independently by autograd: both constraint families'
    # Jacobians with respect to the input.
    weight_grad = torch.func.jacrev(
        lambda z: torch.nn.grad.conv2d_weight(
            z[None], conv.weight.shape, truth.grad_output[None], stride=stride, padding=padding
        )
    )(x).reshape(-1, x.numel())
    forward = torch.func.jacrev(lambda z: conv(z[None])[0])(x).reshape(-1, x.numel())
    system = torch.cat([weight_grad, forward[known.reshape(-1)]])
    expected_rank = int(torch.linalg.matrix_rank(system, rtol=1e-9))
    # Execute
    signal, diag = inverter_for(conv).invert(
        conv,
        "0",
        {"weight": grads["0.weight"], "bias": grads["0.bias"]},
        Signal(value=truth.output, known=known, grad=truth.grad_output),
        shape,
        F64,
    )
    # Assert: the rank is reported as it is; a full-rank system gives the exact input.
    assert diag.rank == expected_rank, diag
    assert_all_close(
        {"grad_input": truth.grad_input}, {"grad_input": signal.grad}, rtol=1e-9, atol=1e-12
    )
    if expected_rank == x.numel():
        assert_all_close({"input": truth.input}, {"input": signal.value}, rtol=1e-7, atol=1e-8)
    else:
        assert diag.rank_deficient


@pytest.mark.parametrize(
    "layer", [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(0.01), nn.Sigmoid(), nn.Tanh()]
)
def test_activation_inverters_match_autograd(layer: nn.Module) -> None:
    # Prepare
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 30), layer, nn.Linear(30, 4)).double()
    x = torch.randn(1, 30, dtype=torch.float64)
    truth = trace(model, x, 2)["2"]
    # Execute
    signal, diag = inverter_for(layer).invert(
        layer, "2", {}, _full_signal(truth.output, truth.grad_output), (30,), F64
    )
    # Assert: the gradient everywhere; the pre-activation wherever declared known.
    assert_all_close(
        {"grad_input": truth.grad_input, "known_input": truth.input[signal.known]},
        {"grad_input": signal.grad, "known_input": signal.value[signal.known]},
        # float64 throughout: a slope rounded to float32 anywhere would be off by ~1e-8.
        rtol=1e-13,
        atol=1e-14,
    )
    if isinstance(layer, nn.ReLU):
        assert torch.equal(signal.known, truth.input > 0)
        assert diag.zero_units == int((truth.input <= 0).sum())
    else:
        assert bool(signal.known.all())


def test_flatten_inverter_reshapes_values_mask_and_gradient() -> None:
    layer = nn.Flatten()
    value, grad = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    signal, _ = inverter_for(layer).invert(
        layer, "f", {}, _full_signal(value, grad), (2, 3, 4), F64
    )
    assert signal.value.shape == signal.grad.shape == signal.known.shape == (2, 3, 4)
    assert torch.equal(signal.value.reshape(-1), value)


def _grads(model: nn.Module, x: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
    from fl_attack.engine import single_sample_gradients

    return single_sample_gradients(model, x, label, dtype=torch.float64)


@pytest.mark.parametrize(
    ("dtype", "noise", "signal"),
    # Noise levels as reconstructions leave them; exact zeros are a decade-wide gap below.
    [(torch.float32, (1e-6, 1e-4), 1e-2), (torch.float64, (2e-12, 2e-9), 1e-3)],
)
def test_relu_zero_threshold_separates_noise_from_signal_despite_exact_zeros(
    dtype: torch.dtype, noise: tuple[float, float], signal: float
) -> None:
    # Prepare: exact zeros, zeros reconstructed at noise level, and small real activations.
    options = SolveOptions.for_dtype(dtype)
    y = torch.cat(
        [
            torch.zeros(50, dtype=torch.float64),
            torch.logspace(*torch.tensor(noise).log10().tolist(), 50, dtype=torch.float64),
            torch.linspace(signal, 1.0, 50, dtype=torch.float64),
        ]
    )
    # Execute
    tau = zero_threshold(y, options)
    # Assert: every zero (exact or noisy) below, every activation above.
    assert noise[1] < tau < signal


@pytest.mark.parametrize(
    ("shape", "unknown_outputs", "path"),
    [
        # rconv-main's first layer: 3 -> 12, stride 2, a square 3072 x 3072 weight system.
        ((3, 32, 32), 0, "factored"),
        ((3, 32, 32), 12, "factored"),  # a few close activation calls above it
        # dlg-lenet's second layer: 12 -> 12, stride 2; the gradient rows leave 16 of each
        # channel's 256 directions open.
        ((12, 16, 16), 0, "gradient-first"),
        # rconv-main's first layer on a one-channel image: 3072 weight rows, 1024 unknowns.
        ((1, 32, 32), 0, "woodbury"),
        ((1, 32, 32), 12, "woodbury"),
    ],
)
def test_large_conv_takes_its_fast_path_and_matches_the_dense_solve(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int], unknown_outputs: int, path: str
) -> None:
    # Prepare: the layer, its true output (known everywhere but at a few units) and gradient.
    conv = nn.Conv2d(shape[0], 12, 5, stride=2, padding=2).double()
    nn.init.uniform_(conv.weight, -0.5, 0.5)
    out_size = 12 * (shape[1] // 2) * (shape[2] // 2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out_size, 5)).double()
    x = torch.rand(shape, dtype=torch.float64)
    truth = trace(model, x, 1)["0"]
    known = torch.ones(truth.output.shape, dtype=torch.bool)
    known.view(-1)[torch.randperm(known.numel())[:unknown_outputs]] = False
    grads = _grads(model, x, 1)
    signal_in = Signal(value=truth.output, known=known, grad=truth.grad_output)
    layer_grads = {"weight": grads["0.weight"], "bias": grads["0.bias"]}

    def invert() -> tuple[Signal, object]:
        return inverter_for(conv).invert(conv, "0", layer_grads, signal_in, shape, F64)

    # Execute: the fast path, then the client's own dense normal equations.
    fast, fast_diag = invert()
    monkeypatch.setattr(conv2d, "_FACTORED_MIN", 10**9)
    dense, dense_diag = invert()
    # Assert: both exact, and the same answer.
    assert f"({path})" in fast_diag.constraints
    assert "(" not in dense_diag.constraints
    assert fast_diag.rank == dense_diag.rank == x.numel()
    assert_all_close({"input": truth.input}, {"input": fast.value}, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(fast.value, dense.value, rtol=1e-8, atol=1e-9)


def test_factored_solve_orders_each_geometry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: two layers of one geometry with different weights; no order known yet, and
    # no factorisation cached from earlier tests.
    monkeypatch.setattr(conv2d, "_column_orders", {})
    clear_weight_cache()
    orders: list[np.ndarray | None] = []
    real = conv2d.factor_square

    def spy(*args: object, order: np.ndarray | None = None, **kwargs: object) -> object:
        orders.append(order)
        return real(*args, order=order, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(conv2d, "factor_square", spy)
    x = torch.rand(3, 32, 32, dtype=torch.float64)
    for seed in (0, 1):
        torch.manual_seed(seed)
        conv = nn.Conv2d(3, 12, 5, stride=2, padding=2).double()
        nn.init.uniform_(conv.weight, -0.5, 0.5)
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3072, 5)).double()
        truth = trace(model, x, 1)["0"]
        known = torch.ones(truth.output.shape, dtype=torch.bool)
        signal_in = Signal(value=truth.output, known=known, grad=truth.grad_output)
        grads = _grads(model, x, 1)
        layer_grads = {"weight": grads["0.weight"], "bias": grads["0.bias"]}
        # Execute
        out, diag = inverter_for(conv).invert(conv, "0", layer_grads, signal_in, (3, 32, 32), F64)
        # Assert: exact either way
        assert "(factored)" in diag.constraints
        assert_all_close({"input": truth.input}, {"input": out.value}, rtol=1e-7, atol=1e-8)
    # Assert: the first weights found the order, the second reused it.
    assert orders[0] is None
    assert orders[1] is not None and sorted(orders[1].tolist()) == list(range(3072))


def _factored_clients(
    count: int,
) -> tuple[nn.Conv2d, list[dict[str, torch.Tensor]], list[Signal], list[torch.Tensor]]:
    """A 3 -> 12 stride-2 layer (its square system takes the factorised path) and ``count``
    clients' layer gradients and output signals, one of them with a few unknown outputs."""
    conv = nn.Conv2d(3, 12, 5, stride=2, padding=2).double()
    nn.init.uniform_(conv.weight, -0.5, 0.5)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3072, 5)).double()
    grads: list[dict[str, torch.Tensor]] = []
    signals: list[Signal] = []
    inputs: list[torch.Tensor] = []
    for k in range(count):
        x = torch.rand(3, 32, 32, dtype=torch.float64)
        truth = trace(model, x, k % 5)["0"]
        known = torch.ones(truth.output.shape, dtype=torch.bool)
        if k == 1:  # a few free rows: their K^-1 e_row columns are solved with the rest
            known.view(-1)[torch.randperm(known.numel())[:5]] = False
        all_grads = _grads(model, x, k % 5)
        grads.append({"weight": all_grads["0.weight"], "bias": all_grads["0.bias"]})
        signals.append(Signal(value=truth.output, known=known, grad=truth.grad_output))
        inputs.append(truth.input)
    return conv, grads, signals, inputs


def test_conv2d_invert_many_equals_invert_client_by_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: four clients of one layer; every sparse solve counted by its columns.
    conv, grads, signals, inputs = _factored_clients(4)
    inverter = inverter_for(conv)
    clear_weight_cache()
    singles = [
        inverter.invert(conv, "0", g, s, (3, 32, 32), F64)
        for g, s in zip(grads, signals, strict=True)
    ]
    columns: list[int] = []
    real = OrderedLU.solve

    def counting(self: OrderedLU, rhs: np.ndarray, trans: str = "N") -> np.ndarray:
        columns.append(1 if rhs.ndim == 1 else rhs.shape[1])
        return real(self, rhs, trans)

    monkeypatch.setattr(OrderedLU, "solve", counting)
    # Execute: the factorisation is cached by now; only the clients' solves remain.
    many = inverter.invert_many(conv, "0", grads, signals, (3, 32, 32), [F64] * 4)
    # Assert: the same inputs and diagnostics (to rounding), exact; one solve for all four
    # clients' columns (1 each, and 5 more for the client with free rows).
    assert columns == [4 + 5]
    for one, batch, truth in zip(singles, many, inputs, strict=True):
        assert not isinstance(batch, Exception)
        torch.testing.assert_close(batch[0].value, one[0].value, rtol=1e-10, atol=1e-12)
        assert batch[1].constraints == one[1].constraints == "gradient+weight (factored)"
        assert batch[1].rank == one[1].rank
        assert_all_close({"input": truth}, {"input": batch[0].value}, rtol=1e-7, atol=1e-8)


def test_conv2d_invert_many_keeps_each_clients_error_in_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: three clients; the second one's solve fails as a too-large system would.
    conv, grads, signals, inputs = _factored_clients(3)
    real = conv2d._finish

    def failing(case: object, *args: object, **kwargs: object) -> object:
        if case is prepared[1]:
            raise ReconstructionError("layer 0 (Conv2d): no room for this client")
        return real(case, *args, **kwargs)  # type: ignore[arg-type]

    prepared: list[object] = []
    real_prepare = conv2d._prepare

    def remembering(*args: object, **kwargs: object) -> object:
        prepared.append(real_prepare(*args, **kwargs))  # type: ignore[arg-type]
        return prepared[-1]

    monkeypatch.setattr(conv2d, "_prepare", remembering)
    monkeypatch.setattr(conv2d, "_finish", failing)
    # Execute
    many = inverter_for(conv).invert_many(conv, "0", grads, signals, (3, 32, 32), [F64] * 3)
    # Assert: the error in the second client's place, the others exact.
    assert isinstance(many[1], ReconstructionError) and "no room" in str(many[1])
    for k in (0, 2):
        result = many[k]
        assert not isinstance(result, Exception)
        assert_all_close({"input": inputs[k]}, {"input": result[0].value}, rtol=1e-7, atol=1e-8)


def test_an_inverter_without_its_own_batch_inverts_each_client_alone() -> None:
    # Prepare: a linear layer's two clients, the second with an all-zero bias gradient.
    layer = nn.Linear(6, 4).double()
    x = torch.rand(6, dtype=torch.float64)
    logits = layer(x)
    grad_out = torch.softmax(logits, 0).detach() - F.one_hot(torch.tensor(1), 4).double()
    good = {"weight": torch.outer(grad_out, x), "bias": grad_out}
    bad = {"weight": torch.outer(grad_out, x), "bias": torch.zeros(4, dtype=torch.float64)}
    inverter = inverter_for(layer)
    # Execute
    many = inverter.invert_many(layer, "fc", [good, bad], [None, None], (6,), [F64, F64])
    # Assert: the first as invert() gives it; the second's error in its place.
    one, _ = inverter.invert(layer, "fc", good, None, (6,), F64)
    assert not isinstance(many[0], Exception)
    torch.testing.assert_close(many[0][0].value, one.value, rtol=0, atol=0)
    assert isinstance(many[1], ReconstructionError) and "all zero" in str(many[1])


def _settle_one_filter_at_a_time(
    grad: torch.Tensor, alt: torch.Tensor, uncertain: torch.Tensor, d_bias: torch.Tensor
) -> torch.Tensor:
    """The plain statement of settle_by_bias: per filter, the best of its 2**k choices."""
    out = grad.clone().reshape(grad.shape[0], -1)
    flat_alt, flat_unc = alt.reshape(grad.shape[0], -1), uncertain.reshape(grad.shape[0], -1)
    for f in range(grad.shape[0]):
        idx = torch.nonzero(flat_unc[f]).flatten().tolist()
        if not idx or len(idx) > conv2d._MAX_ENUMERATED:
            continue
        best, best_error = None, math.inf
        for choice in range(2 ** len(idx)):
            trial = out[f].clone()
            for bit, unit in enumerate(idx):
                if choice >> bit & 1:
                    trial[unit] = flat_alt[f, unit]
            error = abs(float(trial.sum() - d_bias[f]))
            if error < best_error:
                best, best_error = trial, error
        out[f] = best
    return out.reshape(grad.shape)


def test_settling_close_calls_by_bias_picks_each_filters_best_choice() -> None:
    # Prepare: 9 filters with 0-4 close calls, one filter with more than can be enumerated
    # (left as it is); the bias gradient is one choice per filter.
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(10, 4, 4, dtype=torch.float64, generator=gen)
    alt = torch.zeros_like(grad)
    uncertain = torch.zeros_like(grad, dtype=torch.bool)
    for f, k in enumerate([0, 1, 2, 3, 4, 2, 3, 1, 4, 15]):
        uncertain.view(10, -1)[f, torch.randperm(16, generator=gen)[:k]] = True
    truth = torch.where(uncertain & (torch.rand(grad.shape, generator=gen) < 0.5), alt, grad)
    d_bias = truth.sum(dim=(1, 2))
    # Execute
    out = conv2d.settle_by_bias(grad, alt, uncertain, d_bias, eps=F64.eps)
    # Assert: the plain enumeration's answer; the true gradients where they are unique,
    # each taken from the candidate it came from, every enumerated match clear.
    torch.testing.assert_close(
        out.grad, _settle_one_filter_at_a_time(grad, alt, uncertain, d_bias), rtol=0, atol=0
    )
    torch.testing.assert_close(out.grad[:9], truth[:9], rtol=0, atol=1e-12)
    assert (out.resolved, out.unresolved) == (20, 15)
    assert torch.equal(out.took_alt[:9], uncertain[:9] & (truth[:9] == alt[:9]))
    assert torch.equal(out.clear, uncertain & (torch.arange(10) < 9).view(-1, 1, 1))
    # Without the rounding unit, the same choices and no judgement of how clear they are.
    unjudged = conv2d.settle_by_bias(grad, alt, uncertain, d_bias)
    assert torch.equal(unjudged.grad, out.grad) and not unjudged.clear.any()


def test_a_close_call_is_clear_only_when_no_other_choice_fits_as_well() -> None:
    # Prepare: filter 0's two close calls move its sum by the same amount (choosing either
    # one fits); filter 1's by different amounts; filter 2's match sits at rounding level.
    grad = torch.tensor([[1.0, 1.0, 5.0], [1.0, 1.0, 5.0], [1e-20, 1.0, 5.0]])
    alt = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    uncertain = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    d_bias = torch.tensor([6.0, 6.0, 6.0])
    # Execute
    out = conv2d.settle_by_bias(grad, alt, uncertain, d_bias, eps=1e-7)
    # Assert: each filter settled to a combination that fits; only filter 1's is clear.
    torch.testing.assert_close(out.grad.sum(dim=1), d_bias)
    assert out.clear.tolist() == [[False] * 3, [True, True, False], [False] * 3]
    assert out.took_alt[1].tolist() == [True, False, False]


def test_leaky_relu_close_calls_keep_their_value_only_when_it_is_sound() -> None:
    # Prepare: one clear unit, a close call right at the noise floor (either branch gives
    # almost the same pre-activation) and one in between (the branches disagree).
    layer = nn.LeakyReLU(0.2)
    options = SolveOptions.for_dtype(torch.float32)  # noise floor sqrt(eps) = 3.5e-4
    y = torch.tensor([1.0, 2e-5, 2e-4, -0.3], dtype=torch.float64)
    grad = torch.ones_like(y)
    # Execute
    signal, diag = inverter_for(layer).invert(layer, "a", {}, _full_signal(y, grad), (4,), options)
    # Assert: all three small ones are close calls for the gradient; the value of the
    # middle one is left open, the one at the floor is kept.
    assert signal.uncertain is not None
    assert signal.uncertain.tolist() == [False, True, True, False]
    assert signal.known.tolist() == [True, True, False, True]
    assert diag.ambiguous_units == 2
    # The open one carries its other branch's value, for the layer below to settle.
    assert signal.value_alt is not None
    assert signal.value_alt.isnan().tolist() == [True, True, False, True]
    assert float(signal.value_alt[2]) == pytest.approx(2e-4 / 0.2)


def test_a_dense_solve_too_large_for_memory_is_refused_with_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a layer that needs the full dense solve, under a tiny memory limit.
    shape = (3, 16, 16)
    conv = nn.Conv2d(3, 12, 5, stride=2, padding=2).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(768, 5)).double()
    x = torch.rand(shape, dtype=torch.float64)
    truth = trace(model, x, 1)["0"]
    grads = _grads(model, x, 1)
    monkeypatch.setattr(conv2d, "_DENSE_MAX_BYTES", 1000)
    # Execute / Assert: a typed engine error naming the layer, the size and what to do.
    with pytest.raises(ReconstructionError, match=r"layer 0 \(Conv2d\).*768 unknowns.*filters"):
        inverter_for(conv).invert(
            conv,
            "0",
            {"weight": grads["0.weight"], "bias": grads["0.bias"]},
            _full_signal(truth.output, truth.grad_output),
            shape,
            F64,
        )


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(3, 12, 5, stride=2, padding=2), (3, 32, 32)),
        (nn.Conv2d(4, 5, 3, padding="same", dilation=2), (4, 9, 7)),
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 8, 6)),
        (nn.Conv2d(1, 2, 3, padding=4), (1, 5, 5)),  # outputs that see only padding
    ],
)
def test_weight_matrix_is_the_convolution(layer: nn.Conv2d, shape: tuple[int, int, int]) -> None:
    # Prepare: the convolution applied to every unit input is the oracle's dense K.
    weight = layer.weight.detach().to(torch.float64)
    units = torch.eye(shape[0] * shape[1] * shape[2], dtype=torch.float64).reshape(-1, *shape)
    out = F.conv2d(units, weight, None, layer.stride, layer.padding, layer.dilation)
    dense = out.reshape(units.shape[0], -1).T
    # Execute
    by_rows, row_sq, by_columns = conv2d._weight_matrix_of(layer, weight, shape)
    # Assert: both layouts hold exactly K, and the row norms are K's.
    assert by_rows.format == "csr" and by_columns.format == "csc"
    torch.testing.assert_close(torch.from_numpy(by_rows.toarray()), dense, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(by_columns.toarray()), dense, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(row_sq), dense.square().sum(dim=1))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(3, 4, 5, stride=2, padding=2), (3, 11, 10)),
        (nn.Conv2d(2, 3, 3, stride=1, padding=1), (2, 7, 7)),
        (nn.Conv2d(2, 3, 3, stride=3, padding=0, dilation=2), (2, 13, 12)),
        (nn.Conv2d(2, 3, 3, stride=1, padding="same", dilation=2), (2, 6, 5)),
    ],
)
def test_gradient_rows_are_the_weight_gradient_of_each_channel(
    layer: nn.Conv2d, shape: tuple[int, int, int]
) -> None:
    # Prepare: an output gradient with one filter at zero (its rows carry nothing), a
    # random input.
    layer = layer.double()
    out_shape = conv2d.conv_geometry(layer, shape)[-1]
    d_out = torch.randn(out_shape, dtype=torch.float64)
    d_out[1] = 0.0
    z = torch.randn(shape, dtype=torch.float64)
    d_weight = _weight_gradient(layer, z, d_out)
    # Execute
    rows, b_grad = conv2d._gradient_rows(d_out, d_weight, layer, shape, F64)
    # Assert: G z_c is the weight gradient's channel c (the kept rows, in the same scale as
    # B), the zero filter's rows dropped; G^T b, G^T G and G itself agree with each other.
    kh, kw = layer.kernel_size
    f_out = layer.out_channels
    assert rows.count == b_grad.shape[0] == (f_out - 1) * kh * kw
    torch.testing.assert_close(
        rows.times(z.reshape(shape[0], -1).T), b_grad, rtol=1e-12, atol=1e-12
    )
    dense = rows.dense()
    assert dense.shape == (rows.count, shape[1] * shape[2])
    torch.testing.assert_close(rows.transposed_times(b_grad), dense.T @ b_grad)
    torch.testing.assert_close(rows.gram(), dense.T @ dense)


def _weight_gradient(layer: nn.Conv2d, z: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """``dL/dW`` of the conv at input ``z`` and output gradient ``d_out``, by autograd."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    out = F.conv2d(z.unsqueeze(0), weight, None, layer.stride, layer.padding, layer.dilation)
    (grad,) = torch.autograd.grad(out, weight, d_out.unsqueeze(0))
    return grad
