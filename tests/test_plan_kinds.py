"""Every kind of plan the kernels run, under TRITON_INTERPRET=1, forward and backward, for every cell (Elman,
LSTM, LSTM with proj_size, GRU):

* resident (one program with its state in registers; one program over several chunks; S = 2 and 3),
  partially resident (the first chunks on chip, the rest streamed, forward and backward, the
  projection's chunks counted after the gate product's), streamed; the backward's "dz" and "dh"
  exchanges;
* against float64 (the readable references, torch_backend's contract and float64 autograd), with
  lengths, at odd sizes (H = 7, 33, 50, 320), in fp64, fp32 and fp16;
* bitwise: the forward of every plan with the same K chunk, whatever S and residency (every program
  multiplies the chunks in the same order), and the backward's "dz" exchange likewise; the "dh" exchange
  adds the programs' partial sums, an order that depends on S: within tolerance, and bitwise repeatable;
* through the modules with a PackedSequence, the planner replaced by each plan kind.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_birnn
from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels import backward as kb
from fused_birnn.kernels import forward as kf
from fused_birnn.kernels.config import RecurrenceConfig

from test_kernels_gated import Layer, assert_bitwise_equal, check_against_references, run_kernel
from test_kernels_gated_backward import TOL, Case, assert_matches, names

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")

CELLS = [("LSTM", 0), ("LSTM", 20), ("GRU", 0)]
CELL_IDS = ["lstm", "lstm-proj", "gru"]


def plans(H: int) -> dict[str, RecurrenceConfig]:
    """One plan of each kind for hidden size H, chunks of 16 (H = 33: three chunks, the last partial)."""
    def split(S):
        return max(16, 1 << (-(-H // S) - 1).bit_length())
    one = max(16, 1 << (H - 1).bit_length())
    base = dict(block_k=16, block_k_backward=16)
    return {
        "keep": RecurrenceConfig(16, one, True, single_chunk=True),
        "one-chunked": RecurrenceConfig(16, one, True, exchange="dh", **base),
        "s2-dz": RecurrenceConfig(16, split(2), True, split=2, exchange="dz", **base),
        "s3-dh": RecurrenceConfig(16, split(3), True, split=3, exchange="dh", **base),
        "s2-partial-dh": RecurrenceConfig(16, split(2), True, split=2, exchange="dh", resident_chunks=1,
                                          resident_chunks_backward=1, **base),
        "s3-partial-dz": RecurrenceConfig(16, split(3), True, split=3, exchange="dz", resident_chunks=2,
                                          resident_chunks_backward=4, **base),
        "s2-streamed-dh": RecurrenceConfig(16, split(2), False, split=2, exchange="dh", **base),
        "one-streamed-dz": RecurrenceConfig(16, one, False, exchange="dz", **base),
        # 64-row chunks: the narrow products (16-row tiles by 16 columns: Elman's gate product, the projection,
        # the backward's dz and dm gathers) split their K among 4 warps (one batched dot); a register bound
        # (`maxnreg`, as the fp32 split plans set) through both launchers
        "s3-ksplit-dz": RecurrenceConfig(16, split(3), True, split=3, exchange="dz", block_k=64, block_k_backward=64,
                                         max_registers=255),
    }


KINDS = list(plans(33))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cell,proj", CELLS, ids=CELL_IDS)
def test_forward_every_plan_kind(cell, proj, kind):
    """float64 with lengths against the references; every chunked plan bitwise equal to the one-program
    chunked plan (same chunk order whatever S and residency)."""
    layer = Layer(cell, 4, 5, 3, 33, 2, proj, lengths=True)
    got = run_kernel(layer, torch.float64, plans(33)[kind])
    check_against_references(layer, torch.float64, got, kind)
    if kind not in ("keep", "s3-ksplit-dz"):  # (one chunk of 64 / a K split: another summation order)
        assert_bitwise_equal(layer, got, run_kernel(layer, torch.float64, plans(33)["one-chunked"]), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cell,proj", CELLS, ids=CELL_IDS)
def test_backward_every_plan_kind(cell, proj, kind):
    """float64 autograd of torch_backend's differentiable layer, with lengths; the "dz" plans bitwise
    equal to each other."""
    c = Case(cell, proj or None, 4, 5, 33, 2, torch.float64, lengths=True)
    got = c.kernel(config=plans(33)[kind])
    assert_matches(got, c.autograd(), cell, TOL[torch.float64], kind)
    if kind in ("s3-partial-dz", "one-streamed-dz"):  # (the K split sums in another order: not bitwise)
        for name, a, b in zip(names(cell), got, c.kernel(config=plans(33)["s2-dz"])):
            assert (a is None and b is None) or torch.equal(a, b), f"{kind} {name} differs from s2-dz"


def test_ksplit_plan_splits_the_narrow_products():
    from fused_birnn.kernels.config import pass_shape

    cfg = plans(33)["s3-ksplit-dz"]
    assert pass_shape(cfg, 33, 20, 4, True, True)["ks2"] == 4  # the LSTM's projection
    assert pass_shape(cfg, 33, 20, 4, True, False)["ks"] == 4  # the backward's dz gather
    assert pass_shape(cfg, 33, 20, 4, True, False)["ks2"] == 4  # its dm = g @ W_hr
    assert pass_shape(cfg, 33, 33, 1, False, True)["ks"] == 4  # Elman's gate product


def test_elman_every_plan_kind():
    """The Elman cell (G = 1) through the same plans: forward and backward against float64 autograd."""
    torch.manual_seed(0)
    T, B, H, D = 4, 5, 33, 2
    x = torch.randn(T, B, D * H, dtype=torch.float64)
    w = torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=torch.float64)
    g_out, g_hn = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    from fused_birnn import torch_backend as tb

    ref = tb.recurrence_forward(x, w, h0, relu=True, lengths=lengths)
    ref_b = tb.recurrence_backward(ref[0], g_out, g_hn, w, relu=True, lengths=lengths)
    for kind, cfg in plans(H).items():
        out, h_n = kf.recurrence_forward(x, w, h0, relu=True, lengths=lengths, config=cfg)
        torch.testing.assert_close(out, ref[0], atol=1e-12, rtol=1e-12, msg=lambda m: f"{kind}: {m}")
        torch.testing.assert_close(h_n, ref[1], atol=1e-12, rtol=1e-12, msg=lambda m: f"{kind}: {m}")
        grads = kb.recurrence_backward(out, g_out, g_hn, w, relu=True, lengths=lengths, config=cfg)
        for a, b in zip(grads, ref_b):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=lambda m: f"{kind}: {m}")


@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cell,proj", CELLS, ids=CELL_IDS)
def test_dtypes_partial_and_dh(cell, proj, dt):
    """fp32 and fp16 through a partially resident "dh" plan: forward against the float64 references,
    backward against float64 autograd of the same rounded inputs."""
    cfg = plans(33)["s2-partial-dh"]
    layer = Layer(cell, 3, 5, 2, 33, 2, proj, lengths=True)
    check_against_references(layer, dt, run_kernel(layer, dt, cfg), f"{dt}")
    c = Case(cell, proj or None, 3, 5, 33, 2, dt, lengths=True)
    exp = Case.__new__(Case)
    exp.__dict__.update(c.__dict__)
    for name in ("x", "w_hh", "h0", "c0", "w_hr", "b_hh"):
        v = getattr(c, name)
        setattr(exp, name, None if v is None else v.to(dt).double())
    assert_matches(c.kernel(config=cfg), exp.autograd(), cell, TOL[dt], f"{dt}")


@pytest.mark.parametrize("H", [7, 50, 320])
@pytest.mark.parametrize("cell,proj", CELLS, ids=CELL_IDS)
def test_odd_sizes(cell, proj, H):
    """H = 7 (one chunk), 50 and 320 (K not a power of two: chunks of 64, none padded to 512) through
    the planner's kind of plan at that size: S = 3, partial residency, the "dh" exchange."""
    P = min(proj, H - 1) if proj else 0
    block = max(16, 1 << (-(-H // 3) - 1).bit_length())
    cfg = RecurrenceConfig(16, block, True, split=3, exchange="dh", resident_chunks=2, resident_chunks_backward=2)
    layer = Layer(cell, 2, 3, 2, H, 2, P, lengths=True)
    check_against_references(layer, torch.float64, run_kernel(layer, torch.float64, cfg), f"H={H}")
    c = Case(cell, P or None, 2, 3, H, 2, torch.float64, lengths=True)
    assert_matches(c.kernel(config=cfg), c.autograd(), cell, TOL[torch.float64], f"H={H}")


def test_dh_exchange_is_deterministic_and_close_across_splits():
    """The "dh" exchange sums the programs' partial sums in order q = 0 .. S-1: the same input gives the
    same bits; another S differs only by rounding."""
    c = Case("LSTM", None, 4, 5, 33, 2, torch.float32, lengths=True)
    cfg = plans(33)["s3-dh"]
    first, again = c.kernel(config=cfg), c.kernel(config=cfg)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(first, again))
    assert_matches(first, c.kernel(config=replace(cfg, split=2, block_h=32)), "LSTM", TOL[torch.float32], "S=2")


@pytest.mark.parametrize("kind", ["s2-partial-dh", "s3-partial-dz"])
@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_modules_with_packed_sequences(cls, kind, monkeypatch):
    """fused_birnn's modules on the kernels with a PackedSequence, the planner replaced by `kind`:
    outputs, final states and every gradient against nn's class in float64."""
    torch.manual_seed(0)
    kw = dict(proj_size=5) if cls == "LSTM" else {}
    ref = getattr(torch.nn, cls)(3, 33, 2, bidirectional=True, **kw).double()
    ours = getattr(fused_birnn, cls)(3, 33, 2, bidirectional=True, backend="triton", **kw).double()
    ours.load_state_dict(ref.state_dict())
    cfg = plans(33)[kind]
    for module in (kf, kb):
        monkeypatch.setattr(module, "select_config", lambda *a, **k: cfg)
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (4, 1, 3)]
    outs = []
    for m in (ref, ours):
        x = [s.clone().requires_grad_() for s in seqs]
        out, state = m(pack_sequence(x, enforce_sorted=False))
        states = state if isinstance(state, tuple) else (state,)
        loss = (out.data ** 2).sum() + sum((s ** 3).sum() for s in states)
        grads = torch.autograd.grad(loss, x + list(m.parameters()))
        outs.append((out.data, *states, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["keep", "s2-dz", "s2-partial-dh"])
def test_tile_shorter_than_t(kind):
    """Every row of the batch tile shorter than T: the tile runs only its longest row's steps, and the
    LSTM's saved c of the steps past it (direction 0: its final c; direction 1: c0) is filled as
    torch_backend keeps it; the backward reads it. Forward against the references, backward against
    float64 autograd."""
    layer = Layer("LSTM", 6, 3, 2, 33, 2, 0, lengths=True)
    layer.lengths = torch.tensor([4, 2, 1])
    check_against_references(layer, torch.float64, run_kernel(layer, torch.float64, plans(33)[kind]), kind)
    c = Case("LSTM", None, 6, 3, 33, 2, torch.float64, lengths=True)
    c.lengths = torch.tensor([4, 2, 1])
    from fused_birnn import torch_backend as tb
    res = tb.recurrence_forward(c.x_proj(), *c.run_weights(), cell="LSTM", lengths=c.lengths)
    c.out, c.h_n, c.saved = res[0], res[1], res[-1]
    assert_matches(c.kernel(config=plans(33)[kind]), c.autograd(), "LSTM", TOL[torch.float64], kind)
