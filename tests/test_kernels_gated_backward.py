"""The Triton backward recurrence (BPTT) of the gated cells, `kernels.backward.recurrence_backward`, called
directly under the interpreter: LSTM (with and without `proj_size`) and GRU.

The forward is `torch_backend.recurrence_forward` (the contract's `saved` layout), so these tests do not
depend on the forward kernel; the last test also runs the forward kernel where it exists. Each backward
is compared with `torch_backend.recurrence_backward` (same buffers) and with float64 autograd through
`torch_backend.differentiable_layer` (plain differentiable ops): with `x = x_proj` (an identity input
projection), autograd's gradient of x is `grad_pre`, of the initial states `grad_h0` / `grad_c0`, of
`weight_hr` `grad_w_hr`, and the GRU's `b_hn` gradient is `grad_hn` summed over steps and rows.

Covered: lengths (reverse rows start at their own last valid step), SPLIT 1/2/3 through
`FUSED_BIRNN_SPLIT` (bitwise equal to one program: every program reduces in the same order), W_hh on chip
and streamed in K chunks, odd sizes (H=7, B=5, T=1, P=3, one direction), fp64/fp32/fp16 tolerances,
bitwise repeatability, outputs inside NaN guard regions (the interpreter does not bounds-check).
"""

from __future__ import annotations

import pytest
import torch

from fused_birnn import torch_backend as tb
from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels import backward as kb
from fused_birnn.kernels import launch
from fused_birnn.kernels.config import RecurrenceConfig

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")

TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 2e-2}
CELLS = [("LSTM", None), ("LSTM", 3), ("GRU", None)]  # (cell, proj_size)
CELL_IDS = ["lstm", "lstm-proj3", "gru"]
G = {"LSTM": 4, "GRU": 3}


class Case:
    """A layer's recurrence inputs (float64 masters, run in `dtype`) and the forward's outputs."""

    def __init__(self, cell, P, T, B, H, D, dtype, lengths):
        self.cell, self.T, self.B, self.H, self.D, self.dtype = cell, T, B, H, D, dtype
        self.P = P or H
        self.proj = P is not None
        f64 = dict(dtype=torch.float64)
        self.x = torch.randn(T, B, D * G[cell] * H, **f64)  # x_proj itself (an identity input projection)
        self.w_hh = torch.randn(D, G[cell] * H, self.P, **f64) / H ** 0.5
        self.h0 = torch.randn(D, B, self.P, **f64)
        self.c0 = torch.randn(D, B, H, **f64) if cell == "LSTM" else None
        self.w_hr = torch.randn(D, self.P, H, **f64) / H ** 0.5 if self.proj else None
        self.b_hh = torch.randn(D, 3 * H, **f64) if cell == "GRU" else None  # GRU: b_hn inside r * (...)
        self.lengths = None
        if lengths:
            self.lengths = torch.randint(1, T + 1, (B,))
            self.lengths[0] = T
        res = tb.recurrence_forward(self.x_proj().to(dtype), *self.run_weights(),
                                    cell=cell, lengths=self.lengths)
        self.out, self.h_n, self.saved = res[0], res[1], res[-1]
        self.g_out = torch.randn(T, B, D * self.P, **f64).to(dtype)
        self.g_hn = torch.randn(D, B, self.P, **f64).to(dtype)
        self.g_cn = torch.randn(D, B, H, **f64).to(dtype) if cell == "LSTM" else None

    def x_proj(self):
        if self.cell != "GRU":
            return self.x
        fold = self.b_hh.view(self.D, 3, self.H).clone()
        fold[:, 2] = 0  # b_hr, b_hz fold into x_proj; b_hn is passed apart
        return self.x + fold.reshape(-1)

    def run_weights(self):
        """(w_hh, h0, c0, w_hr, b_hn) in the run dtype, `recurrence_forward`'s positional order."""
        dt = self.dtype
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        b_hn = None if self.b_hh is None else self.b_hh[:, 2 * self.H:].contiguous()
        return cast(self.w_hh), cast(self.h0), cast(self.c0), cast(self.w_hr), cast(b_hn)

    def backward_kwargs(self):
        w_hh, h0, c0, w_hr, _ = self.run_weights()
        return dict(cell=self.cell, lengths=self.lengths, saved=self.saved, h0=h0 if self.cell == "GRU" else None,
                    c0=c0, grad_c_n=self.g_cn, w_hr=w_hr)

    def kernel(self, **kw):
        return kb.recurrence_backward(self.out, self.g_out, self.g_hn, self.run_weights()[0],
                                      **self.backward_kwargs(), **kw)

    def torch_path(self):
        return tb.recurrence_backward(self.out, self.g_out, self.g_hn, self.run_weights()[0],
                                      **self.backward_kwargs())

    def autograd(self):
        """float64 autograd through `differentiable_layer`: the same tuple as `recurrence_backward`
        (GRU: `grad_hn` summed over steps and rows, compared with b_hn's gradient)."""
        D, H, GH = self.D, self.H, G[self.cell] * self.H
        x = self.x.clone().requires_grad_()
        h0 = self.h0.clone().requires_grad_()
        eye = torch.eye(D * GH, dtype=torch.float64)
        params, leaves = [], [x, h0]
        for d in range(D):
            w_ih = eye[d * GH:(d + 1) * GH]  # direction d reads its own block of x: x_proj = x
            w_hh = self.w_hh[d].clone().requires_grad_()
            params += [w_ih, w_hh]
            if self.cell == "GRU":
                b_hh = self.b_hh[d].clone().requires_grad_()
                params += [torch.zeros(GH, dtype=torch.float64), b_hh]
                leaves.append(b_hh)
            if self.proj:
                w_hr = self.w_hr[d].clone().requires_grad_()
                params.append(w_hr)
                leaves.append(w_hr)
        c0 = None
        if self.cell == "LSTM":
            c0 = self.c0.clone().requires_grad_()
            leaves.append(c0)
        res = tb.differentiable_layer(x, h0, params, self.lengths, cell=self.cell, c0=c0)
        loss = (res[0] * self.g_out.double()).sum() + (res[1] * self.g_hn.double()).sum()
        if self.cell == "LSTM":
            loss = loss + (res[2] * self.g_cn.double()).sum()
        grads = torch.autograd.grad(loss, leaves)
        if self.cell == "GRU":
            db_hn = torch.stack([g[2 * H:] for g in grads[2:]])  # [D, H]
            return grads[0], grads[1], db_hn
        grad_w_hr = torch.stack(grads[2:2 + D]) if self.proj else None
        return grads[0], grads[1], grads[-1], grad_w_hr


def names(cell):
    return ["grad_pre", "grad_h0", "grad_hn"] if cell == "GRU" else ["grad_pre", "grad_h0", "grad_c0", "grad_w_hr"]


def assert_matches(got, exp, cell, tol, what):
    for name, a, b in zip(names(cell), got, exp):
        if b is None:
            assert a is None, f"{what} {name}: expected None"
            continue
        if cell == "GRU" and name == "grad_hn" and b.dim() == 2:  # autograd: b_hn's gradient
            a = a.double().unflatten(-1, b.shape).sum((0, 1))  # [T, B, D*H] -> [D, H]
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, msg=lambda m: f"{what} {name}: {m}")


def split_config(S, H, on_chip=True):
    block_h = max(16, 1 << (-(-H // S) - 1).bit_length())
    return RecurrenceConfig(16, block_h, on_chip, split=S, block_k=None if on_chip else 16)


# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_parity_fp64(cell, P, lengths):
    """One program per group (the plan under the interpreter): the torch path and float64 autograd."""
    c = Case(cell, P, 5, 5, 7, 2, torch.float64, lengths)
    got = c.kernel()
    assert_matches(got, c.torch_path(), cell, 1e-12, "vs torch_backend")
    assert_matches(got, c.autograd(), cell, TOL[torch.float64], "vs autograd")


@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_split_bitwise_equal_and_streamed(cell, P, monkeypatch):
    """FUSED_BIRNN_SPLIT=1, 2, 3 (2 and 3: launch per step; with a projection two phases a step): bitwise
    equal results. W_hh streamed in 16-wide K chunks by 1 and 3 programs: bitwise equal to each other,
    right against float64 autograd. fp32 with lengths."""
    c = Case(cell, P, 4, 5, 7, 2, torch.float32, lengths=True)
    monkeypatch.setenv(launch.SPLIT_ENV, "1")
    one = c.kernel()
    assert_matches(one, c.autograd(), cell, TOL[torch.float32], "S=1 vs autograd")
    for S in (2, 3):
        monkeypatch.setenv(launch.SPLIT_ENV, str(S))
        for name, a, b in zip(names(cell), c.kernel(), one):
            assert (a is None and b is None) or torch.equal(a, b), f"S={S} {name} differs from S=1"
    streamed = [c.kernel(config=split_config(S, c.H, on_chip=False)) for S in (1, 3)]
    assert_matches(streamed[0], c.autograd(), cell, TOL[torch.float32], "streamed vs autograd")
    for name, a, b in zip(names(cell), *streamed):
        assert (a is None and b is None) or torch.equal(a, b), f"streamed S=3 {name} differs from S=1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_dtypes_against_float64(cell, P, dtype):
    """fp32 and fp16 runs (fp32 accumulation, dz rounded to the input dtype for the dots, as in the
    torch path) against float64 autograd of the same (rounded) inputs and forward."""
    c = Case(cell, P, 4, 5, 7, 2, dtype, lengths=True)
    exp = Case.__new__(Case)
    exp.__dict__.update(c.__dict__)
    for name in ("x", "w_hh", "h0", "c0", "w_hr", "b_hh"):  # the rounded inputs, in float64
        v = getattr(c, name)
        setattr(exp, name, None if v is None else v.to(dtype).double())
    assert_matches(c.kernel(), exp.autograd(), cell, TOL[dtype], f"{dtype}")


@pytest.mark.parametrize("shape", [(1, 5, 7, 2), (3, 1, 1, 1), (6, 17, 9, 1)], ids=lambda s: "T{}-B{}-H{}-D{}".format(*s))
@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_odd_sizes(cell, P, shape):
    T, B, H, D = shape
    c = Case(cell, min(P, H) if P else None, T, B, H, D, torch.float64, lengths=B > 1)
    assert_matches(c.kernel(), c.autograd(), cell, TOL[torch.float64], f"{shape}")


@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_guard_regions_and_repeatable(cell, P, monkeypatch):
    """Every output written inside its buffer and nowhere else (buffers placed inside NaN guards; the
    interpreter does not bounds-check), S = 2 with on-chip slices; a second run is bitwise equal."""
    c = Case(cell, P, 3, 5, 7, 2, torch.float64, lengths=False)
    pad = 37
    real_empty = torch.Tensor.new_empty
    real_zeros = torch.Tensor.new_zeros
    guards = []

    def guarded(fill):
        def make(self, size, *a, **kw):
            if self.dtype != torch.float64 or kw or a:
                return (real_zeros if fill == 0 else real_empty)(self, size, *a, **kw)
            n = torch.Size(size).numel()
            big = torch.full((n + 2 * pad,), float("nan"), dtype=self.dtype)
            view = big[pad:pad + n].view(size)
            if fill == 0:
                view.zero_()
            guards.append(big)
            return view
        return make

    cfg = split_config(2, c.H)
    monkeypatch.setattr(torch.Tensor, "new_empty", guarded(None))
    monkeypatch.setattr(torch.Tensor, "new_zeros", guarded(0))
    got = c.kernel(config=cfg)
    monkeypatch.undo()
    assert guards, "the launcher allocated no guarded output"
    for big in guards:
        assert torch.isnan(big[:pad]).all() and torch.isnan(big[-pad:]).all(), "a kernel wrote outside a buffer"
    for name, a in zip(names(cell), got):
        assert a is None or not torch.isnan(a).any(), f"{name} left partly unwritten"
    assert_matches(got, c.torch_path(), cell, 1e-12, "guarded")
    again = c.kernel(config=cfg)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, again))


def test_bad_arguments():
    c = Case("LSTM", None, 2, 2, 3, 2, torch.float64, lengths=False)
    w_hh = c.run_weights()[0]
    with pytest.raises(ValueError, match="cell"):
        kb.recurrence_backward(c.out, c.g_out, c.g_hn, w_hh, cell="lstm")
    with pytest.raises(ValueError, match="saved"):
        kb.recurrence_backward(c.out, c.g_out, c.g_hn, w_hh, cell="LSTM", c0=c.c0)
    with pytest.raises(ValueError, match="c0"):
        kb.recurrence_backward(c.out, c.g_out, c.g_hn, w_hh, cell="LSTM", saved=c.saved)
    with pytest.raises(ValueError, match="w_hr"):
        kb.recurrence_backward(c.out, c.g_out, c.g_hn, w_hh[:, :9], cell="GRU", saved=c.saved, h0=c.h0,
                               w_hr=c.w_hh)
    with pytest.raises(ValueError, match="expected"):
        kb.recurrence_backward(c.out, c.g_out, c.g_hn[:, :1], w_hh, cell="LSTM", saved=c.saved, c0=c.c0)


def test_elman_through_the_same_launcher():
    """cell=None / 'RNN_RELU' keep the Elman contract `(grad_pre, grad_h0)`."""
    T, B, H, D = 4, 5, 7, 2
    x = torch.randn(T, B, D * H, dtype=torch.float64)
    w_hh = torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=torch.float64)
    lens = torch.tensor([4, 1, 3, 2, 4])
    for relu in (False, True):
        out, h_n = tb.recurrence_forward(x, w_hh, h0, relu=relu, lengths=lens)
        g_out, g_hn = torch.randn_like(out), torch.randn_like(h_n)
        got = kb.recurrence_backward(out, g_out, g_hn, w_hh, relu=relu, lengths=lens)
        exp = tb.recurrence_backward(out, g_out, g_hn, w_hh, relu=relu, lengths=lens)
        assert len(got) == 2
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell,P", CELLS, ids=CELL_IDS)
def test_with_the_forward_kernel(cell, P):
    """The forward kernel's `saved` (where kernels.forward has the gated launcher) feeds this backward."""
    from fused_birnn.kernels import forward as kf

    fwd = getattr(kf, "recurrence_forward", None)
    if fwd is None:
        pytest.skip("kernels.forward.recurrence_forward does not exist yet")
    c = Case(cell, P, 4, 5, 7, 2, torch.float64, lengths=True)
    res = fwd(c.x_proj(), *c.run_weights(), cell=cell, lengths=c.lengths)
    torch.testing.assert_close(res[0], c.out, atol=1e-12, rtol=1e-12)
    c.out, c.saved = res[0], res[-1]
    assert_matches(c.kernel(), c.autograd(), cell, TOL[torch.float64], "kernel forward + backward")


def test_backward_own_streamed_chunk():
    """A plan whose backward streams W in its own K chunk (`block_k_backward`, the projected LSTM's GPU
    plans): 16-wide chunks where the forward's are 32, against float64 autograd."""
    c = Case("LSTM", 20, 4, 3, 40, 2, torch.float32, lengths=True)
    cfg = RecurrenceConfig(16, 16, False, split=3, block_k=32, block_k_backward=16)
    assert cfg.k_block(40, forward=False) == 16 and cfg.k_block(40) == 32
    assert_matches(c.kernel(config=cfg), c.autograd(), "LSTM", TOL[torch.float32], "own chunk vs autograd")
