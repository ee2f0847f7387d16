"""The pure-PyTorch references must equal torch.nn.RNN / LSTM / GRU (CPU, float64), values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fused_birnn.reference import (
    gru_reference,
    lstm_reference,
    rnn_reference,
    run_direction,
    run_gru_direction,
    run_lstm_direction,
)

ATOL = RTOL = 1e-10


def _make(
    input_size: int,
    hidden_size: int,
    num_layers: int,
    *,
    nonlinearity: str = "tanh",
    bias: bool = True,
    batch_first: bool = False,
    bidirectional: bool = False,
    seed: int = 0,
) -> nn.RNN:
    torch.manual_seed(seed)
    rnn = nn.RNN(
        input_size,
        hidden_size,
        num_layers,
        nonlinearity=nonlinearity,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
    )
    return rnn.double()


def _check_forward(rnn: nn.RNN, x: torch.Tensor, hx: torch.Tensor | None) -> None:
    with torch.no_grad():
        expected_out, expected_hn = rnn(x, hx)
        out, h_n = rnn_reference(
            x,
            hx,
            dict(rnn.named_parameters()),
            num_layers=rnn.num_layers,
            nonlinearity=rnn.nonlinearity,
            bias=rnn.bias,
            batch_first=rnn.batch_first,
            bidirectional=rnn.bidirectional,
        )
    torch.testing.assert_close(out, expected_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_n, expected_hn, atol=ATOL, rtol=RTOL)


def _inputs(rnn: nn.RNN, seq_len: int, batch: int, *, with_hx: bool):
    shape = (batch, seq_len) if rnn.batch_first else (seq_len, batch)
    x = torch.randn(*shape, rnn.input_size, dtype=torch.float64)
    num_directions = 2 if rnn.bidirectional else 1
    hx = None
    if with_hx:
        num_states = rnn.num_layers * num_directions
        hx = torch.randn(num_states, batch, rnn.hidden_size, dtype=torch.float64)
    return x, hx


@pytest.mark.parametrize(
    "num_layers, nonlinearity, bias, batch_first, with_hx, bidirectional",
    list(itertools.product([1, 2, 3, 4], ["tanh", "relu"], [True, False], [False, True],
                           [True, False], [False, True])),
)
def test_matches_nn_rnn(num_layers, nonlinearity, bias, batch_first, with_hx, bidirectional):
    rnn = _make(5, 6, num_layers, nonlinearity=nonlinearity, bias=bias,
                batch_first=batch_first, bidirectional=bidirectional)
    x, hx = _inputs(rnn, seq_len=4, batch=3, with_hx=with_hx)
    _check_forward(rnn, x, hx)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "input_size, hidden_size, num_layers, seq_len, batch",
    [
        (3, 7, 2, 5, 2),  # odd hidden size
        (4, 5, 3, 6, 1),  # single sequence
        (4, 5, 3, 1, 3),  # single time step
        (1, 4, 2, 5, 3),  # scalar input features
        (1, 7, 2, 1, 1),  # all of the above at once
        (9, 1, 2, 4, 2),  # scalar hidden state
    ],
)
def test_odd_sizes(input_size, hidden_size, num_layers, seq_len, batch, bidirectional):
    for batch_first, nonlinearity in [(False, "tanh"), (True, "relu")]:
        rnn = _make(input_size, hidden_size, num_layers, nonlinearity=nonlinearity,
                    batch_first=batch_first, bidirectional=bidirectional)
        x, hx = _inputs(rnn, seq_len, batch, with_hx=True)
        _check_forward(rnn, x, hx)


def test_seed_configuration():
    """The forum post's configuration: batch_first input (15, 5, 25), so B = 15 and T = 5."""
    rnn = _make(25, 50, 4, batch_first=True, bidirectional=True)
    x = torch.randn(15, 5, 25, dtype=torch.float64)
    h0 = torch.randn(8, 15, 50, dtype=torch.float64)
    _check_forward(rnn, x, h0)
    _check_forward(rnn, x, None)


@pytest.mark.parametrize("reverse", [False, True])
def test_run_direction_is_one_direction_of_nn_rnn(reverse):
    rnn = _make(4, 6, 1, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    h0 = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        expected_out, expected_hn = rnn(x, h0)
        d = int(reverse)
        suffix = "_l0_reverse" if reverse else "_l0"
        p = dict(rnn.named_parameters())
        out, h_last = run_direction(
            x, h0[d], p["weight_ih" + suffix], p["weight_hh" + suffix],
            p["bias_ih" + suffix], p["bias_hh" + suffix], reverse=reverse,
        )
    torch.testing.assert_close(out, expected_out[..., d * 6:(d + 1) * 6], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_last, expected_hn[d], atol=ATOL, rtol=RTOL)
    # The last state read is t = T-1 forward, t = 0 reverse.
    torch.testing.assert_close(h_last, out[0 if reverse else -1], atol=0, rtol=0)


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize(
    "num_layers, nonlinearity, bias, batch_first, bidirectional",
    [
        (1, "tanh", True, False, False),
        (2, "relu", False, True, True),
        (3, "tanh", True, True, True),
        (4, "tanh", True, False, True),
    ],
)
def test_gradients_match_nn_rnn(num_layers, nonlinearity, bias, batch_first, bidirectional):
    rnn = _make(4, 5, num_layers, nonlinearity=nonlinearity, bias=bias,
                batch_first=batch_first, bidirectional=bidirectional)
    x, hx = _inputs(rnn, seq_len=4, batch=3, with_hx=True)
    x.requires_grad_(True)
    hx.requires_grad_(True)
    names, params = zip(*rnn.named_parameters())
    # Weight the outputs so every element gets a distinct upstream gradient.
    expected_out, expected_hn = rnn(x, hx)
    g_out = torch.randn_like(expected_out)
    g_hn = torch.randn_like(expected_hn)
    expected = _grads((expected_out * g_out).sum() + (expected_hn * g_hn).sum(), [x, hx, *params])

    out, h_n = rnn_reference(
        x, hx, dict(zip(names, params)), num_layers=num_layers, nonlinearity=nonlinearity,
        bias=bias, batch_first=batch_first, bidirectional=bidirectional,
    )
    actual = _grads((out * g_out).sum() + (h_n * g_hn).sum(), [x, hx, *params])

    for name, a, e in zip(["input", "hx", *names], actual, expected):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


def test_gradcheck():
    rnn = _make(3, 4, 2, bidirectional=True)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    names, params = zip(*rnn.named_parameters())

    def f(x, hx, *params):
        return rnn_reference(x, hx, dict(zip(names, params)), num_layers=2, bidirectional=True)

    assert torch.autograd.gradcheck(f, (x, hx, *params))


def test_errors():
    rnn = _make(3, 4, 1)
    p = dict(rnn.named_parameters())
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_reference(torch.randn(2, 1, 3, dtype=torch.float64), None, p, num_layers=1,
                      nonlinearity="gelu")
    with pytest.raises(ValueError, match="input"):
        rnn_reference(torch.randn(2, 3, dtype=torch.float64), None, p, num_layers=1)
    with pytest.raises(ValueError, match="hx"):
        rnn_reference(torch.randn(2, 1, 3, dtype=torch.float64),
                      torch.zeros(2, 1, 4, dtype=torch.float64), p, num_layers=1)


# ---------------------------------------------------------------------------------------------- LSTM, GRU

def _gated(cell: str, input_size: int, hidden_size: int, num_layers: int, *, proj_size: int = 0,
           bias: bool = True, batch_first: bool = False, bidirectional: bool = False) -> nn.Module:
    kwargs = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if cell == "lstm":
        module = nn.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size, **kwargs)
    else:
        module = nn.GRU(input_size, hidden_size, num_layers, **kwargs)
    # uniform draws in a wider range than the default init, so that gates saturate and cancel less
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.8, 0.8)
    return module.double()


def _gated_reference(module: nn.Module, x: torch.Tensor, hx, params=None):
    params = dict(module.named_parameters()) if params is None else params
    fn = lstm_reference if isinstance(module, nn.LSTM) else gru_reference
    return fn(x, hx, params, num_layers=module.num_layers, bias=module.bias,
              batch_first=module.batch_first, bidirectional=module.bidirectional)


def _gated_state(module: nn.Module, batch: int):
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    h_out = module.proj_size if isinstance(module, nn.LSTM) and module.proj_size else module.hidden_size
    h0 = torch.randn(L * D, batch, h_out, dtype=torch.float64)
    if isinstance(module, nn.LSTM):
        return h0, torch.randn(L * D, batch, module.hidden_size, dtype=torch.float64)
    return h0


def _flatten(result):
    """(output, h_n) or (output, (h_n, c_n)) -> a flat tuple."""
    out, state = result
    return (out, *state) if isinstance(state, tuple) else (out, state)


GATED_CONFIGS = [
    # cell, proj_size, num_layers, bias, batch_first, bidirectional
    (cell, proj, layers, bias, batch_first, bidirectional)
    for cell, proj in [("lstm", 0), ("lstm", 3), ("gru", 0)]
    for layers, bias, batch_first, bidirectional in [
        (1, True, False, False), (1, False, True, True), (2, True, True, True), (2, False, False, False),
        (3, True, False, True), (3, True, True, False),
    ]
]


@pytest.mark.parametrize("cell, proj_size, num_layers, bias, batch_first, bidirectional", GATED_CONFIGS)
@pytest.mark.parametrize("with_hx", [True, False])
def test_gated_matches_nn(cell, proj_size, num_layers, bias, batch_first, bidirectional, with_hx):
    module = _gated(cell, 4, 5, num_layers, proj_size=proj_size, bias=bias, batch_first=batch_first,
                    bidirectional=bidirectional)
    T, B = 4, 3
    x = torch.randn(*((B, T) if batch_first else (T, B)), 4, dtype=torch.float64)
    hx = _gated_state(module, B) if with_hx else None
    with torch.no_grad():
        expected = _flatten(module(x, hx))
        actual = _flatten(_gated_reference(module, x, hx))
    assert len(actual) == len(expected)
    for name, a, e in zip(["output", "h_n", "c_n"], actual, expected):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell, proj_size", [("lstm", 0), ("lstm", 2), ("gru", 0)])
@pytest.mark.parametrize(
    "input_size, hidden_size, num_layers, seq_len, batch",
    [(3, 7, 2, 5, 2), (1, 7, 2, 1, 1), (9, 3, 2, 4, 5), (4, 5, 1, 1, 5)],
)
def test_gated_odd_sizes(cell, proj_size, input_size, hidden_size, num_layers, seq_len, batch):
    for batch_first, bidirectional in [(False, True), (True, False)]:
        module = _gated(cell, input_size, hidden_size, num_layers, proj_size=proj_size,
                        batch_first=batch_first, bidirectional=bidirectional)
        x = torch.randn(*((batch, seq_len) if batch_first else (seq_len, batch)), input_size,
                        dtype=torch.float64)
        hx = _gated_state(module, batch)
        with torch.no_grad():
            for a, e in zip(_flatten(_gated_reference(module, x, hx)), _flatten(module(x, hx)), strict=True):
                torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)


def test_lstm_projection_shapes():
    """proj_size: h and the output are proj wide, c is not, layer 1 reads D*proj features."""
    module = _gated("lstm", 10, 20, 2, proj_size=5, bidirectional=True)
    assert module.weight_ih_l1.shape == (80, 10)
    x = torch.randn(7, 3, 10, dtype=torch.float64)
    with torch.no_grad():
        out, (h_n, c_n) = _gated_reference(module, x, None)
    assert out.shape == (7, 3, 10) and h_n.shape == (4, 3, 5) and c_n.shape == (4, 3, 20)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell, proj_size", [("lstm", 0), ("lstm", 3), ("gru", 0)])
def test_gated_direction_is_one_direction_of_nn(cell, proj_size, reverse):
    module = _gated(cell, 4, 6, 1, proj_size=proj_size, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    hx = _gated_state(module, 3)
    d = int(reverse)
    p = dict(module.named_parameters())
    suffix = "_l0_reverse" if reverse else "_l0"
    weights = [p[k + suffix] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    with torch.no_grad():
        expected_out, expected_state = module(x, hx)
        if cell == "lstm":
            w_hr = p["weight_hr" + suffix] if proj_size else None
            out, (h_last, c_last) = run_lstm_direction(x, hx[0][d], hx[1][d], *weights, w_hr, reverse=reverse)
            torch.testing.assert_close(c_last, expected_state[1][d], atol=ATOL, rtol=RTOL)
            expected_hn = expected_state[0]
        else:
            out, h_last = run_gru_direction(x, hx[d], *weights, reverse=reverse)
            expected_hn = expected_state
    width = out.shape[-1]
    torch.testing.assert_close(out, expected_out[..., d * width:(d + 1) * width], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_last, expected_hn[d], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_last, out[0 if reverse else -1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "cell, proj_size, num_layers, bias, batch_first, bidirectional",
    [("lstm", 0, 2, True, False, True), ("lstm", 3, 2, False, True, True), ("lstm", 2, 1, True, False, False),
     ("gru", 0, 2, True, True, True), ("gru", 0, 3, False, False, False)],
)
def test_gated_gradients_match_nn(cell, proj_size, num_layers, bias, batch_first, bidirectional):
    module = _gated(cell, 4, 5, num_layers, proj_size=proj_size, bias=bias, batch_first=batch_first,
                    bidirectional=bidirectional)
    x = torch.randn(*((3, 4) if batch_first else (4, 3)), 4, dtype=torch.float64, requires_grad=True)
    hx = _gated_state(module, 3)
    states = [s.requires_grad_(True) for s in (hx if isinstance(hx, tuple) else (hx,))]
    hx = tuple(states) if cell == "lstm" else states[0]
    names, params = zip(*module.named_parameters())
    expected = _flatten(module(x, hx))
    upstream = [torch.randn_like(e) for e in expected]
    wrt = [x, *states, *params]
    expected_grads = _grads(sum((e * u).sum() for e, u in zip(expected, upstream)), wrt)
    actual = _flatten(_gated_reference(module, x, hx, dict(zip(names, params))))
    actual_grads = _grads(sum((a * u).sum() for a, u in zip(actual, upstream)), wrt)
    for name, a, e in zip(["input", *["h0", "c0"][:len(states)], *names], actual_grads, expected_grads,
                          strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


def test_gated_errors():
    lstm = _gated("lstm", 3, 4, 1, proj_size=2)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    p = dict(lstm.named_parameters())
    with pytest.raises(ValueError, match="input"):
        lstm_reference(x[0], None, p, num_layers=1)
    h0 = torch.zeros(1, 1, 2, dtype=torch.float64)
    c0 = torch.zeros(1, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"hx\[0\]"):  # h0 is proj_size wide
        lstm_reference(x, (c0, c0), p, num_layers=1)
    with pytest.raises(ValueError, match=r"hx\[1\]"):  # c0 is hidden_size wide
        lstm_reference(x, (h0, h0), p, num_layers=1)
    gru = _gated("gru", 3, 4, 1)
    with pytest.raises(ValueError, match="hx"):
        gru_reference(x, torch.zeros(2, 1, 4, dtype=torch.float64), dict(gru.named_parameters()), num_layers=1)
