"""The PyTorch path's recurrence for every cell (torch_backend.recurrence_forward / recurrence_backward /
differentiable_layer) against the readable references and nn.LSTM / nn.GRU, float64, CPU.

A layer is built here the way a caller does it: one input GEMM with the foldable biases, the recurrence,
and after its backward the weight gradients as GEMMs (`_layer_backward`, the formulas the module code
needs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_birnn import torch_backend
from fused_birnn.reference import run_direction, run_gru_direction, run_lstm_direction
from fused_birnn.torch_backend import differentiable_layer, recurrence_backward, recurrence_forward, saved_shape

ATOL = RTOL = 1e-10
GRAD_TOL = 1e-9
CELL_NAMES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN}


# ----------------------------------------------------------------------------------------------- helpers

def _module(cell: str, I: int, H: int, *, proj: int = 0, bias: bool = True, D: int = 2) -> nn.Module:
    kwargs = dict(bias=bias, bidirectional=D == 2)
    if cell == "LSTM":
        kwargs["proj_size"] = proj
    module = CELL_NAMES[cell](I, H, 1, **kwargs).double()
    with torch.no_grad():  # wider than the default init: saturated and cancelling gates get tested too
        for p in module.parameters():
            p.uniform_(-1.0, 1.0)
    return module


def _params(module: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The layer's parameters per direction, as fresh leaves: {"w_ih", "w_hh"[, "b_ih", "b_hh"][, "w_hr"]}."""
    short = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh", "weight_hr": "w_hr"}
    D = 2 if module.bidirectional else 1
    per_direction = [{} for _ in range(D)]
    for name, p in module.named_parameters():
        kind, rest = name.rsplit("_l0", 1)
        per_direction[int(rest == "_reverse")][short[kind]] = p.detach().clone().requires_grad_(True)
    return per_direction


def _states(cell: str, module: nn.Module, B: int):
    D = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size if cell == "LSTM" else module.hidden_size
    h0 = torch.randn(D, B, P, dtype=torch.float64)
    c0 = torch.randn(D, B, module.hidden_size, dtype=torch.float64) if cell == "LSTM" else None
    return h0, c0


def _lengths(B: int, T: int) -> torch.Tensor:
    """Distinct lengths in [1, T], T and 1 included where B allows."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if B > 1:
        lengths[-1] = 1
    return lengths


def _gates(cell: str) -> int:
    return torch_backend.gate_count(cell)


def _projection(x: torch.Tensor, params: list[dict], cell: str):
    """x_proj [T, B, D*G*H] with the foldable biases (GRU: not b_hn), and b_hn [D, H] or None."""
    T, B, I = x.shape
    w_ih = torch.cat([p["w_ih"] for p in params])
    x_proj = (x.reshape(T * B, I) @ w_ih.t()).view(T, B, -1)
    if "b_ih" not in params[0]:
        return x_proj, None
    H = params[0]["w_ih"].shape[0] // _gates(cell)
    folded = []
    for p in params:
        b_hh = p["b_hh"]
        if cell == "GRU":
            b_hh = torch.cat((b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])))
        folded.append(p["b_ih"] + b_hh)
    b_hn = torch.stack([p["b_hh"][2 * H:] for p in params]) if cell == "GRU" else None
    return x_proj + torch.cat(folded), b_hn


def _layer_forward(x, h0, c0, params, cell, lengths=None):
    """(out, h_n, c_n or None, saved or None) through recurrence_forward."""
    x_proj, b_hn = _projection(x, params, cell)
    w_hh = torch.stack([p["w_hh"] for p in params])
    w_hr = torch.stack([p["w_hr"] for p in params]) if "w_hr" in params[0] else None
    result = recurrence_forward(x_proj, w_hh, h0, c0, w_hr, b_hn, cell=cell, lengths=lengths)
    if cell == "LSTM":
        return result
    if cell == "GRU":
        out, h_n, saved = result
        return out, h_n, None, saved
    return (*result, None, None)


def _hidden_weight_grad(grad_hidden, out, h0, reverse: bool, lengths):
    """dW_hh of one direction: sum over steps of grad_hidden_t^T h_{t-1}, h_{t-1} read from out (or h0)."""
    T, B, GH = grad_hidden.shape
    P = out.shape[-1]
    if not reverse:  # h_{t-1} of step t is out[t-1], h0 at t = 0
        later, earlier, first = grad_hidden[1:], out[:-1], grad_hidden[0]
    else:  # the reverse direction's previous state is out[t+1] (0 past a row's end), h0 at the row's last step
        later, earlier = grad_hidden[:-1], out[1:]
        first = grad_hidden[T - 1] if lengths is None else grad_hidden[lengths - 1, torch.arange(B)]
    return first.t() @ h0 + later.reshape(-1, GH).t() @ earlier.reshape(-1, P)


@torch.no_grad()  # as in an autograd backward: the recurrence's backward is not itself differentiable
def _layer_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, params, cell, lengths, out, saved):
    """Every gradient of the layer: {"x", "h0", "c0", (d, kind)}."""
    T, B, I = x.shape
    D = len(params)
    w_hh = torch.stack([p["w_hh"] for p in params])
    w_hr = torch.stack([p["w_hr"] for p in params]) if "w_hr" in params[0] else None
    result = recurrence_backward(
        out, grad_out, grad_h_n, w_hh, cell=cell, lengths=lengths, saved=saved, h0=h0, c0=c0,
        grad_c_n=grad_c_n, w_hr=w_hr)
    grad_pre, grad_h0 = result[:2]
    grads = {"h0": grad_h0, "c0": result[2] if cell == "LSTM" else None}
    GH = grad_pre.shape[-1] // D
    H = GH // _gates(cell)
    P = out.shape[-1] // D
    gp = grad_pre.reshape(T * B, D * GH)
    grads["x"] = (gp @ torch.cat([p["w_ih"] for p in params])).view(T, B, I)
    grad_w_ih = gp.t() @ x.reshape(T * B, I)
    for d, p in enumerate(params):
        gp_d = grad_pre[..., d * GH:(d + 1) * GH]
        hidden_d = gp_d
        if cell == "GRU":  # the hidden side's n block is the gradient of W_hn h + b_hn
            hidden_d = torch.cat((gp_d[..., :2 * H], result[2][..., d * H:(d + 1) * H]), -1)
        grads[d, "w_ih"] = grad_w_ih[d * GH:(d + 1) * GH]
        grads[d, "w_hh"] = _hidden_weight_grad(hidden_d, out[..., d * P:(d + 1) * P], h0[d], d == 1, lengths)
        if "b_ih" in p:
            grads[d, "b_ih"] = gp_d.sum((0, 1))
            grads[d, "b_hh"] = hidden_d.sum((0, 1))
        if "w_hr" in p:
            grads[d, "w_hr"] = result[3][d]
    return grads


def _reference_layer(x, h0, c0, params, cell):
    """The readable reference, one layer, all directions: (out, h_n, c_n or None)."""
    outs, h_n, c_n = [], [], []
    for d, p in enumerate(params):
        args = (p["w_ih"], p["w_hh"], p.get("b_ih"), p.get("b_hh"))
        if cell == "LSTM":
            out, (h, c) = run_lstm_direction(x, h0[d], c0[d], *args, p.get("w_hr"), reverse=d == 1)
            c_n.append(c)
        elif cell == "GRU":
            out, h = run_gru_direction(x, h0[d], *args, reverse=d == 1)
        else:
            out, h = run_direction(x, h0[d], *args, reverse=d == 1)
        outs.append(out)
        h_n.append(h)
    return torch.cat(outs, -1), torch.stack(h_n), torch.stack(c_n) if c_n else None


def _packed_nn_layer(module, x, h0, c0, params, lengths):
    """nn.LSTM / nn.GRU on a PackedSequence with `params` swapped in: (out padded with 0, h_n, c_n)."""
    D = len(params)
    long = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}
    swapped = {f"{long[k]}_l0{'_reverse' if d else ''}": v for d, p in enumerate(params) for k, v in p.items()}
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = (h0, c0) if c0 is not None else h0
    out, state = torch.func.functional_call(module, swapped, (packed, hx))
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    if c0 is not None:
        return out, state[0], state[1]
    assert D == state.shape[0]
    return out, state, None


CASES = [  # cell, I, H, proj, bias, D
    ("LSTM", 3, 4, 0, True, 2),
    ("LSTM", 3, 5, 2, True, 2),
    ("LSTM", 2, 4, 3, False, 1),
    ("LSTM", 1, 7, 0, False, 1),
    ("GRU", 3, 4, 0, True, 2),
    ("GRU", 1, 7, 0, False, 2),
    ("GRU", 2, 3, 0, True, 1),
    ("RNN_TANH", 3, 4, 0, True, 2),
]
CASE_IDS = [f"{c}-I{i}-H{h}-P{p}-{'bias' if b else 'nobias'}-D{d}" for c, i, h, p, b, d in CASES]


# ----------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("cell, I, H, proj, bias, D", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("T, B", [(4, 3), (1, 5), (6, 1)])
def test_forward_matches_reference(cell, I, H, proj, bias, D, T, B):
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = _states(cell, module, B)
    with torch.no_grad():
        out, h_n, c_n, saved = _layer_forward(x, h0, c0, params, cell)
        expected = _reference_layer(x, h0, c0, params, cell)
    torch.testing.assert_close(out, expected[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_n, expected[1], atol=ATOL, rtol=RTOL)
    if cell == "LSTM":
        torch.testing.assert_close(c_n, expected[2], atol=ATOL, rtol=RTOL)
    assert (saved is None) == (cell == "RNN_TANH")
    if saved is not None:
        assert saved.shape == saved_shape(cell, T, B, D, H)


@pytest.mark.parametrize("cell, I, H, proj, bias, D", [c for c in CASES if c[0] != "RNN_TANH"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "RNN_TANH"])
def test_forward_lengths_match_packed_nn(cell, I, H, proj, bias, D):
    T, B = 5, 4
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    lengths = _lengths(B, T)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for b in range(B):  # padded input never reaches a state or an output
        x[lengths[b]:, b] = math.nan
    h0, c0 = _states(cell, module, B)
    with torch.no_grad():
        out, h_n, c_n, _ = _layer_forward(x, h0, c0, params, cell, lengths)
        expected = _packed_nn_layer(module, x, h0, c0, params, lengths)
    torch.testing.assert_close(out, expected[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h_n, expected[1], atol=ATOL, rtol=RTOL)
    if cell == "LSTM":
        torch.testing.assert_close(c_n, expected[2], atol=ATOL, rtol=RTOL)


def test_elman_cell_argument_is_the_relu_flag():
    """The original signature (relu=) and cell= run the same skeleton: bitwise equal."""
    x_proj = torch.randn(5, 3, 8, dtype=torch.float64)
    w_hh = torch.randn(2, 4, 4, dtype=torch.float64) / 2
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 1])
    for relu, cell in [(False, "RNN_TANH"), (True, "RNN_RELU")]:
        a = recurrence_forward(x_proj, w_hh, h0, relu=relu, lengths=lengths)
        b = recurrence_forward(x_proj, w_hh, h0, cell=cell, lengths=lengths)
        assert len(a) == 2
        for u, v in zip(a, b):
            assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------- backward

def _check_backward(cell, module, x, h0, c0, params, lengths, expected_fn):
    """Our backward (recurrence_backward + GEMMs) against autograd of `expected_fn`, random upstream
    gradients on every output."""
    with torch.no_grad():
        out, h_n, c_n, saved = _layer_forward(x, h0, c0, params, cell, lengths)
    upstream = [torch.randn_like(t) for t in (out, h_n, c_n) if t is not None]
    if lengths is not None:  # what reaches padded outputs is not the layer's business (they are constant)
        for b in range(x.shape[1]):
            upstream[0][lengths[b]:, b] = 0
    saved_before = None if saved is None else saved.clone()
    grads = _layer_backward(upstream[0], upstream[1], upstream[2] if cell == "LSTM" else None,
                            x, h0, c0, params, cell, lengths, out, saved)
    assert saved is None or torch.equal(saved, saved_before), "the backward must not modify saved"

    leaves = {"x": x, "h0": h0, "c0": c0}
    leaves |= {(d, k): v for d, p in enumerate(params) for k, v in p.items()}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    for v in leaves.values():
        v.requires_grad_(True)
    outputs = [t for t in expected_fn() if t is not None]
    expected = torch.autograd.grad(outputs, list(leaves.values()), upstream)
    for (name, _), e in zip(leaves.items(), expected, strict=True):
        torch.testing.assert_close(grads[name], e, atol=GRAD_TOL, rtol=GRAD_TOL,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("cell, I, H, proj, bias, D", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("T, B", [(4, 3), (1, 2)])
def test_backward_matches_autograd_of_reference(cell, I, H, proj, bias, D, T, B):
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = _states(cell, module, B)
    _check_backward(cell, module, x, h0, c0, params, None, lambda: _reference_layer(x, h0, c0, params, cell))


@pytest.mark.parametrize("cell, I, H, proj, bias, D", [c for c in CASES if c[0] != "RNN_TANH"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "RNN_TANH"])
def test_backward_lengths_match_packed_nn(cell, I, H, proj, bias, D):
    T, B = 5, 4
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    lengths = _lengths(B, T)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = _states(cell, module, B)
    _check_backward(cell, module, x, h0, c0, params, lengths,
                    lambda: _packed_nn_layer(module, x, h0, c0, params, lengths))


@pytest.mark.parametrize("cell, proj", [("LSTM", 0), ("LSTM", 2), ("GRU", 0)])
def test_recurrence_gradients_ignore_padded_garbage(cell, proj):
    """nan in the padded steps of x_proj (what a padded input gives) reaches no state, no output and no
    gradient of the recurrence: grad_pre is exactly 0 there, everything finite."""
    T, B, H = 5, 3, 4
    D = 2
    G = _gates(cell)
    P = proj or H
    lengths = torch.tensor([5, 3, 1])
    x_proj = torch.randn(T, B, D * G * H, dtype=torch.float64)
    for b in range(B):
        x_proj[lengths[b]:, b] = math.nan
    w_hh = torch.randn(D, G * H, P, dtype=torch.float64) / 2
    h0 = torch.randn(D, B, P, dtype=torch.float64)
    c0 = torch.randn(D, B, H, dtype=torch.float64) if cell == "LSTM" else None
    w_hr = torch.randn(D, P, H, dtype=torch.float64) / 2 if proj else None
    b_hn = torch.randn(D, H, dtype=torch.float64) if cell == "GRU" else None
    out, h_n, *rest = recurrence_forward(x_proj, w_hh, h0, c0, w_hr, b_hn, cell=cell, lengths=lengths)
    assert torch.isfinite(out).all() and torch.isfinite(h_n).all()
    grad_c_n = torch.randn_like(c0) if cell == "LSTM" else None
    result = recurrence_backward(out, torch.randn_like(out), torch.randn_like(h_n), w_hh, cell=cell,
                                 lengths=lengths, saved=rest[-1], h0=h0 if cell == "GRU" else None, c0=c0,
                                 grad_c_n=grad_c_n, w_hr=w_hr)
    for t in result:
        assert t is None or torch.isfinite(t).all()
    grad_pre = result[0]
    for b in range(B):
        assert (grad_pre[lengths[b]:, b] == 0).all()


# -------------------------------------------------------------------------------------------- gradcheck

class _Layer(torch.autograd.Function):
    """A throwaway differentiable layer from recurrence_forward / recurrence_backward and the GEMMs."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, cell, kinds, *flat):
        D = h0.shape[0]
        params = [dict(zip(kinds, flat[d * len(kinds):(d + 1) * len(kinds)])) for d in range(D)]
        out, h_n, c_n, saved = _layer_forward(x, h0, c0, params, cell, lengths)
        ctx.save_for_backward(x, h0, c0, out, saved, *flat)
        ctx.cell, ctx.kinds, ctx.lengths = cell, kinds, lengths
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n=None):
        x, h0, c0, out, saved, *flat = ctx.saved_tensors
        kinds = ctx.kinds
        D = h0.shape[0]
        params = [dict(zip(kinds, flat[d * len(kinds):(d + 1) * len(kinds)])) for d in range(D)]
        grads = _layer_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, params, ctx.cell, ctx.lengths,
                                out, saved)
        return (grads["x"], grads["h0"], grads["c0"], None, None, None,
                *[grads[d, k] for d in range(D) for k in kinds])


@pytest.mark.parametrize("cell, proj, bias, D", [("LSTM", 0, True, 2), ("LSTM", 2, True, 2), ("LSTM", 2, False, 1),
                                                 ("GRU", 0, True, 2), ("GRU", 0, False, 1)])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck(cell, proj, bias, D, with_lengths):
    """Fast mode (random directions: every gradient still enters); one full Jacobian check follows."""
    _gradcheck(cell, proj, bias, D, with_lengths, fast_mode=True)


def test_gradcheck_full_jacobian():
    _gradcheck("LSTM", 2, True, 2, True, fast_mode=False, H=3)
    _gradcheck("GRU", 0, True, 2, True, fast_mode=False, H=2)


def _gradcheck(cell, proj, bias, D, with_lengths, *, fast_mode, H=3):
    T, B, I = 3, 3, 2
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    kinds = list(params[0])
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = _states(cell, module, B)
    h0.requires_grad_(True)
    if c0 is not None:
        c0.requires_grad_(True)
    lengths = torch.tensor([3, 2, 1]) if with_lengths else None
    flat = [p[k] for p in params for k in kinds]

    def f(x, h0, c0, *flat):
        return _Layer.apply(x, h0, c0, lengths, cell, kinds, *flat)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *flat), fast_mode=fast_mode)


# ---------------------------------------------------------------------------------- differentiable_layer

@pytest.mark.parametrize("cell, I, H, proj, bias, D", CASES, ids=CASE_IDS)
def test_differentiable_layer_matches_the_fast_path(cell, I, H, proj, bias, D):
    """Values and (autograd) gradients of the composite equal recurrence_forward / our backward, with lengths."""
    T, B = 4, 3
    module = _module(cell, I, H, proj=proj, bias=bias, D=D)
    params = _params(module)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = _states(cell, module, B)
    lengths = torch.tensor([4, 1, 3])
    flat = [v for p in params for v in p.values()]
    composite = lambda: differentiable_layer(x, h0, flat, lengths, cell=cell, c0=c0)  # noqa: E731
    with torch.no_grad():
        fast = _layer_forward(x, h0, c0, params, cell, lengths)
        slow = composite()
    assert len(slow) == (3 if cell == "LSTM" else 2)
    for a, e in zip(slow, fast):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)
    _check_backward(cell, module, x, h0, c0, params, lengths, composite)


def test_differentiable_layer_second_order():
    """The composite is differentiable twice (what double backward through the lead's Function uses)."""
    module = _module("LSTM", 2, 3, proj=2, D=2)
    params = _params(module)
    flat = [v for p in params for v in p.values()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = _states("LSTM", module, 2)
    h0.requires_grad_(True)
    c0.requires_grad_(True)
    lengths = torch.tensor([3, 2])

    def f(x, h0, c0, w_ih, w_hh):
        ps = [w_ih, w_hh, *flat[2:]]
        return differentiable_layer(x, h0, ps, lengths, cell="LSTM", c0=c0)

    assert torch.autograd.gradgradcheck(f, (x, h0, c0, flat[0], flat[1]), fast_mode=True)


def test_differentiable_layer_under_torch_func():
    module = _module("GRU", 2, 3, D=2)
    flat = [v.detach() for p in _params(module) for v in p.values()]
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    h0, _ = _states("GRU", module, 2)

    def loss(x):
        out, h_n = differentiable_layer(x, h0, flat, None, cell="GRU")
        return out.square().sum() + h_n.sum()

    expected = torch.autograd.grad(loss(x.requires_grad_(True)), x)[0]
    torch.testing.assert_close(torch.func.grad(loss)(x.detach()), expected, atol=ATOL, rtol=RTOL)


# -------------------------------------------------------------------------------------------- arguments

def test_cell_arguments():
    x_proj = torch.randn(2, 1, 8, dtype=torch.float64)
    w_hh = torch.randn(1, 8, 2, dtype=torch.float64)
    h0 = torch.zeros(1, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cell"):
        recurrence_forward(x_proj, w_hh, h0, cell="lstm")
    with pytest.raises(ValueError, match="relu"):
        recurrence_forward(x_proj, w_hh, h0, h0, relu=True, cell="LSTM")
    with pytest.raises(ValueError, match="c0"):
        recurrence_forward(x_proj, w_hh, h0, cell="LSTM")
    with pytest.raises(ValueError, match="b_hn"):
        recurrence_forward(x_proj, w_hh, h0, h0, None, torch.zeros(1, 2), cell="LSTM")
    with pytest.raises(ValueError, match="saved"):
        recurrence_backward(x_proj, x_proj, h0, w_hh, cell="GRU", h0=h0)
    with pytest.raises(ValueError, match="params"):
        differentiable_layer(torch.zeros(2, 1, 3), h0, [torch.zeros(6, 3)] * 3, None, cell="GRU")
    assert saved_shape("RNN_RELU", 3, 2, 2, 4) is None
    assert saved_shape("LSTM", 3, 2, 2, 4) == (3, 2 * 2 * 5 * 4)
    assert saved_shape("GRU", 3, 2, 2, 4) == (3, 2 * 2 * 4 * 4)


# ------------------------------------------------------------------------------------------------- cuda

@pytest.mark.cuda
@pytest.mark.parametrize("cell, H, proj", [("LSTM", 128, 0), ("LSTM", 512, 0), ("LSTM", 1024, 256),
                                           ("GRU", 128, 0), ("GRU", 1024, 0)])
def test_saved_vs_cudnn_reserve(cell, H, proj):
    """What this path saves per layer is no more than cuDNN's reserve space for the same shape
    (bidirectional, fp32), read from the reserve tensor `torch._cudnn_rnn` returns."""
    T, B, I, D = 64, 16, 128, 2
    kwargs = {"proj_size": proj} if cell == "LSTM" else {}
    module = CELL_NAMES[cell](I, H, 1, bidirectional=True, device="cuda", **kwargs)
    x = torch.randn(T, B, I, device="cuda")
    P = proj or H
    hx = torch.zeros(D, B, P, device="cuda")
    cx = torch.zeros(D, B, H, device="cuda") if cell == "LSTM" else None
    weights = module._flat_weights
    mode = {"LSTM": 2, "GRU": 3}[cell]  # cudnnRNNMode_t
    with torch.no_grad():
        reserve = torch._cudnn_rnn(x, weights, len(weights) // D, None, hx, cx, mode, H, proj, 1, False, 0.0,
                                   True, True, [], None)[3]
    reserve_bytes = reserve.numel() * reserve.element_size()
    ours = math.prod(saved_shape(cell, T, B, D, H)) * 4
    print(f"{cell} H={H} proj={proj}: ours {ours} B, cuDNN reserve {reserve_bytes} B "
          f"({ours / reserve_bytes:.2f}x)")
    assert ours <= reserve_bytes
