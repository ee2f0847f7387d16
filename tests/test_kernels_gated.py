"""The forward recurrence kernel for the gated cells (LSTM with and without proj_size, GRU), called
through `kernels.forward.recurrence_forward`, against the float64 definitions of fused_birnn.reference
and against `torch_backend.recurrence_forward` (the contract: out, h_n, c_n and `saved`).

* SPLIT forced to 1, 2, 3 (on-chip slices): bitwise equal to S = 1 on the CPU, as for Elman
  (tests/test_split.py); streamed slices within tolerance; launch per step (per phase with a projection).
* lengths: each row stops at its own length, reverse rows start at their own last step; `saved`'s c part
  holds the kept cell state at inactive steps (the backward reads c_{s-1}); gates are compared where active.
* odd sizes (H=7, B=5, T=1, I=1, P=3), with and without biases, fp64/fp32/fp16 tolerances, guard regions
  around every output (the interpreter does not bounds-check), the two-barrier step of the projected
  LSTM with the programs running concurrently as threads.
"""

from __future__ import annotations

import pytest
import torch

from fused_birnn import torch_backend
from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels import forward as kf
from fused_birnn.kernels import launch
from fused_birnn.kernels.config import RecurrenceConfig
from fused_birnn.reference import run_gru_direction, run_lstm_direction

from test_kernels import assert_guard_untouched, guarded

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2}
GATES = {"LSTM": 4, "GRU": 3}


class Layer:
    """One layer's parameters (float64, nn's layout per direction) and the kernel's buffers from them."""

    def __init__(self, cell, T, B, I, H, D, proj=0, bias=True, lengths=False):
        G = GATES[cell]
        P = proj or H
        self.cell, self.T, self.B, self.H, self.D, self.P = cell, T, B, H, D, P
        k = H ** -0.5
        u = lambda *s: (torch.rand(*s, dtype=torch.float64) * 2 - 1) * k * 2  # noqa: E731
        self.x = torch.randn(T, B, I, dtype=torch.float64)
        self.w_ih = u(D, G * H, I)
        self.w_hh = u(D, G * H, P)
        self.b_ih = u(D, G * H) if bias else None
        self.b_hh = u(D, G * H) if bias else None
        self.w_hr = u(D, P, H) if proj else None
        self.h0 = torch.randn(D, B, P, dtype=torch.float64)
        self.c0 = torch.randn(D, B, H, dtype=torch.float64) if cell == "LSTM" else None
        self.lengths = None
        if lengths:
            self.lengths = torch.randint(1, T + 1, (B,))
            self.lengths[0] = T
            if B > 2:
                self.lengths[1] = 1

    def buffers(self, dt):
        """x_proj with the foldable biases, w_hh, h0, and the cell's optional tensors, in dtype dt."""
        H, D = self.H, self.D
        x_proj = torch.einsum("tbi,dgi->tbdg", self.x, self.w_ih)
        b_hn = None
        if self.b_ih is not None:
            b_hh = self.b_hh.clone()
            if self.cell == "GRU":  # b_hn stays inside r * (...)
                b_hn = b_hh[:, 2 * H:].clone()
                b_hh[:, 2 * H:] = 0
            x_proj = x_proj + self.b_ih + b_hh
        kw = dict(c0=self.c0, w_hr=self.w_hr, b_hn=b_hn)
        kw = {n: v.to(dt) for n, v in kw.items() if v is not None}
        return (x_proj.reshape(self.T, self.B, -1).to(dt), self.w_hh.to(dt), self.h0.to(dt)), kw

    def reference(self):
        """float64, per row over its valid prefix (nn's definition through fused_birnn.reference):
        out (0 at padded steps), h_n, c_n (LSTM)."""
        T, B, D, P = self.T, self.B, self.D, self.P
        out = torch.zeros(T, B, D * P, dtype=torch.float64)
        h_n = torch.empty(D, B, P, dtype=torch.float64)
        c_n = torch.empty(D, B, self.H, dtype=torch.float64)
        for b in range(B):
            n = T if self.lengths is None else int(self.lengths[b])
            for d in range(D):
                bias = (None, None) if self.b_ih is None else (self.b_ih[d], self.b_hh[d])
                x = self.x[:n, b:b + 1]
                if self.cell == "LSTM":
                    o, (h, c) = run_lstm_direction(x, self.h0[d, b:b + 1], self.c0[d, b:b + 1], self.w_ih[d],
                                                   self.w_hh[d], *bias, None if self.w_hr is None else self.w_hr[d],
                                                   reverse=d == 1)
                    c_n[d, b] = c[0]
                else:
                    o, h = run_gru_direction(x, self.h0[d, b:b + 1], self.w_ih[d], self.w_hh[d], *bias,
                                             reverse=d == 1)
                out[:n, b, d * P:(d + 1) * P] = o[:, 0]
                h_n[d, b] = h[0]
        return (out, h_n, c_n) if self.cell == "LSTM" else (out, h_n)


def run_kernel(layer, dt, cfg):
    args, kw = layer.buffers(dt)
    return kf.recurrence_forward(*args, **kw, cell=layer.cell, lengths=layer.lengths, config=cfg)


def split_config(S, H, on_chip=True, block_k=None, **kw):
    block_h = max(16, 1 << (-(-H // S) - 1).bit_length())
    return RecurrenceConfig(16, block_h, on_chip, split=S if S > 1 else None, block_k=block_k, **kw)


def saved_parts(layer, saved):
    T, B, D, H = layer.T, layer.B, layer.D, layer.H
    G = GATES[layer.cell]
    return saved[:, :D * B * G * H].view(T, D, B, G, H), saved[:, D * B * G * H:].view(T, D, B, H)


def check_against_references(layer, dt, got, what=""):
    """got = recurrence_forward's tuple in dt: states against the float64 definition, every output
    (saved included) against torch_backend's float64 run."""
    tol = TOL[dt]
    close = lambda a, b, name: torch.testing.assert_close(  # noqa: E731
        a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{what} {name}: {m}")
    ref = layer.reference()
    for name, a, b in zip(("out", "h_n", "c_n"), got, ref):
        close(a, b, name)
    args, kw = layer.buffers(torch.float64)
    contract = torch_backend.recurrence_forward(*args, **kw, cell=layer.cell, lengths=layer.lengths)
    assert len(got) == len(contract) and all(a.shape == b.shape and a.dtype == dt for a, b in zip(got, contract))
    for name, a, b in zip(("out", "h_n", "c_n" if layer.cell == "LSTM" else "saved"), got, contract):
        if name != "saved":
            close(a, b, f"{name} (torch_backend)")
    gates, state = saved_parts(layer, got[-1])
    ref_gates, ref_state = saved_parts(layer, contract[-1])
    active = active_mask(layer)
    close(gates[active], ref_gates[active], "saved gates (active steps)")
    if layer.cell == "LSTM":  # c everywhere: the kept state at inactive steps
        close(state, ref_state, "saved c")
    else:
        close(state[active], ref_state[active], "saved n (active steps)")


CASES = [  # (cell, proj_size): P = 3 < H = 7 with a projection
    ("LSTM", 0), ("LSTM", 3), ("GRU", 0),
]
IDS = ["lstm", "lstm-proj", "gru"]


@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.float16], ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("cell,proj", CASES, ids=IDS)
def test_parity_and_split_bitwise(cell, proj, dt):
    """S = 1 against both references; S = 2 and 3 (launch per step, per phase with a projection)
    bitwise equal to S = 1 in fp32/fp64 (fp16: within tolerance, see the comment below)."""
    layer = Layer(cell, 4, 5, 3, 7, 2, proj, bias=dt != torch.float32, lengths=dt == torch.float32)
    one = run_kernel(layer, dt, split_config(1, 7))
    check_against_references(layer, dt, one, "S=1")
    for S in (2, 3):
        got = run_kernel(layer, dt, split_config(S, 7))
        if dt == torch.float16:  # a launch per step carries c (and the GRU's own h) over in fp16, the
            check_against_references(layer, dt, got, f"S={S}")  # persistent kernel in fp32
        else:
            assert_bitwise_equal(layer, got, one, f"S={S}")


def active_mask(layer):
    if layer.lengths is None:
        return torch.ones(layer.T, layer.D, layer.B, dtype=torch.bool)
    return torch_backend.activity_mask(layer.lengths, layer.T, layer.D, torch.float64)[..., 0].bool()


def assert_bitwise_equal(layer, got, expected, what):
    """Every output bitwise; saved where it is defined (gates at active steps; c everywhere)."""
    for name, a, b in zip(("out", "h_n", "c_n"), got[:-1], expected[:-1]):
        assert torch.equal(a, b), f"{what}: {name} differs"
    active = active_mask(layer)
    (g, st), (g_ref, st_ref) = saved_parts(layer, got[-1]), saved_parts(layer, expected[-1])
    assert torch.equal(g[active], g_ref[active]), f"{what}: saved gates differ"
    if layer.cell == "LSTM":
        assert torch.equal(st, st_ref), f"{what}: saved c differs"
    else:
        assert torch.equal(st[active], st_ref[active]), f"{what}: saved n differs"


@pytest.mark.parametrize("cell,proj", CASES, ids=IDS)
def test_lengths_and_streamed_slices(cell, proj):
    """Per-row lengths (a row of length 1, reverse rows starting at their own last step) with W_hh (and
    W_hr) streamed in 16-wide K chunks, one program and three per group; H=20 gives a partial chunk."""
    layer = Layer(cell, 5, 5, 2, 20, 2, proj and 18, lengths=True)
    for S in (1, 3):
        got = run_kernel(layer, torch.float64, split_config(S, 20, on_chip=False, block_k=16))
        check_against_references(layer, torch.float64, got, f"streamed S={S}")


@pytest.mark.parametrize("cell,proj", CASES, ids=IDS)
def test_odd_sizes(cell, proj):
    """T=1, I=1, B=1, one direction, no biases; and H=1 bidirectional (one unit per gate)."""
    layer = Layer(cell, 1, 1, 1, 7, 1, proj, bias=False)
    check_against_references(layer, torch.float64, run_kernel(layer, torch.float64, None), "T=1")
    layer = Layer(cell, 3, 2, 1, 1, 2, proj and 1)
    check_against_references(layer, torch.float64, run_kernel(layer, torch.float64, split_config(1, 1)), "H=1")


@pytest.mark.parametrize("cell,proj", CASES, ids=IDS)
def test_guard_regions(cell, proj):
    """Outputs inside NaN-filled buffers: every element of out, h_n, c_n and saved's c part is written,
    nothing outside them (two programs per group, odd H, B, P)."""
    layer = Layer(cell, 3, 5, 2, 7, 2, proj)
    (x_proj, w_hh, h0), kw = layer.buffers(torch.float64)
    T, B, D, H, P = layer.T, layer.B, layer.D, layer.H, layer.P
    mode = cell
    big_out, out = guarded((T, B, D * P), torch.float64)
    big_hn, h_n = guarded((D, B, P), torch.float64)
    flat = torch.full((D * B * H + 6,), float("nan"), dtype=torch.float64)  # c_n must be contiguous
    c_n = flat[3:-3].view(D, B, H)
    big_sv, saved = guarded(torch_backend.saved_shape(mode, T, B, D, H), torch.float64)
    if cell == "GRU" and "b_hn" not in kw:
        kw["b_hn"] = torch.zeros(D, H, dtype=torch.float64)
    kf._forward(x_proj, w_hh.contiguous(), h0, out, h_n, mode, c0=kw.get("c0"), c_n=c_n if cell == "LSTM" else None,
                w_hr=kw.get("w_hr"), b_hn=kw.get("b_hn"), saved=saved, config=split_config(2, H))
    assert_guard_untouched(big_out, out)
    assert_guard_untouched(big_hn, h_n)
    assert_guard_untouched(big_sv, saved)
    if cell == "LSTM":
        assert torch.isnan(flat[:3]).all() and torch.isnan(flat[-3:]).all() and not torch.isnan(c_n).any()
    check_against_references(layer, torch.float64, (out, h_n, c_n, saved) if cell == "LSTM" else (out, h_n, saved))


def test_two_barriers_per_step_with_concurrent_programs(monkeypatch):
    """The projected LSTM split in one persistent launch (m exchanged, barrier, h exchanged, barrier)
    with the programs of the grid running concurrently as threads: bitwise the one-program result."""
    from test_split import threaded_launcher

    layer = Layer("LSTM", 3, 3, 2, 7, 2, 5, lengths=True)
    one = run_kernel(layer, torch.float64, split_config(1, 7))
    monkeypatch.setattr(launch, "_launch", threaded_launcher())
    got = run_kernel(layer, torch.float64, split_config(2, 7, persistent=True, max_spins=10**7))
    assert_bitwise_equal(layer, got, one, "threads, S=2")
    launch.check_errors(torch.device("cpu"))  # nothing raised


def test_env_split_and_plan_arguments(monkeypatch):
    """FUSED_BIRNN_SPLIT forces S for the gated cells too; select_config gets the cell and proj_size."""
    from fused_birnn.kernels import config

    seen, plans = [], []
    real_run, real_select = launch.run_steps, kf.select_config

    def spy_run(kernel, grid, *a, **kw):
        seen.append(grid[0])
        return real_run(kernel, grid, *a, **kw)

    def spy_select(*a):
        plans.append(a[6:])
        return real_select(*a)

    monkeypatch.setattr(launch, "run_steps", spy_run)
    monkeypatch.setattr(kf, "select_config", spy_select)
    monkeypatch.setenv(launch.SPLIT_ENV, "3")
    layer = Layer("LSTM", 2, 2, 2, 7, 2, 3)
    got = run_kernel(layer, torch.float64, None)
    assert seen == [3] and plans == [("LSTM", 3)]
    check_against_references(layer, torch.float64, got)
    with pytest.raises(ValueError, match="proj_size"):
        config.select_config(7, 2, torch.float32, False, None, None, "GRU", 3)


def test_contract_errors():
    """The launcher takes what torch_backend takes and rejects what it rejects (ValueError naming it)."""
    layer = Layer("LSTM", 2, 2, 2, 7, 1)
    (x_proj, w_hh, h0), kw = layer.buffers(torch.float64)
    with pytest.raises(ValueError, match="c0"):
        kf.recurrence_forward(x_proj, w_hh, h0, cell="LSTM")
    with pytest.raises(ValueError, match="b_hn"):
        kf.recurrence_forward(x_proj, w_hh, h0, kw["c0"], b_hn=torch.zeros(1, 7, dtype=torch.float64), cell="LSTM")
    with pytest.raises(ValueError, match="recurrence_forward"):
        kf.recurrence_forward(x_proj[..., :-1], w_hh, h0, kw["c0"], cell="LSTM")


def test_missing_program_aborts_the_projected_step(monkeypatch):
    """Program (1, 0, 0) never runs: its partner gives up at the step's first barrier (m), writes NaN for
    its h and c from there on, sets the error flag; the other direction's group is unaffected; the next
    launch raises RuntimeError, once."""
    from test_split import threaded_launcher

    layer = Layer("LSTM", 2, 2, 2, 7, 2, 5)
    ref = run_kernel(layer, torch.float64, split_config(1, 7))
    monkeypatch.setattr(launch, "_launch", threaded_launcher(skip={(1, 0, 0)}))
    cfg = split_config(2, 7, persistent=True, max_spins=20_000)
    out, h_n, c_n, _ = run_kernel(layer, torch.float64, cfg)
    P, UP, U = 5, 3, 4  # program 0 owns state units [0, 3) and hidden units [0, 4)
    assert torch.isnan(out[:, :, :UP]).all() and torch.isnan(h_n[0, :, :UP]).all()
    assert torch.isnan(c_n[0, :, :U]).all()
    torch.testing.assert_close(out[:, :, P:], ref[0][:, :, P:])  # direction 1's group is unaffected
    torch.testing.assert_close(c_n[1], ref[2][1])
    assert int(launch.error_flag(torch.device("cpu"))[0]) == 1
    monkeypatch.setattr(launch, "_launch", threaded_launcher())
    with pytest.raises(RuntimeError, match="never arrived"):
        run_kernel(layer, torch.float64, cfg)
    launch.check_errors(torch.device("cpu"))  # raised once, then cleared
