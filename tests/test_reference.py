"""The pure-PyTorch reference must equal torch.nn.RNN (CPU, float64), values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fused_birnn.reference import rnn_reference, run_direction

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
