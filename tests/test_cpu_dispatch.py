"""`backend='auto'` on a CPU without the interpreter, with its default choice (what runs unmeasured:
`FUSED_BIRNN_AUTOTUNE=0`, which conftest sets; tests/test_tune.py tests the measured choice): which calls
ATen's own kernels serve (nn's kernel: inference and short training sequences) and which run our path,
and that the results are nn.RNN's either way. The suite runs under TRITON_INTERPRET=1, so these tests
switch the module's view of the interpreter off."""

import pytest
import torch
from conftest import assert_same_outcome, outcome
from torch.nn.utils.rnn import pack_sequence

import fused_birnn
import fused_birnn.functional as functional
import fused_birnn.rnn as rnn_module
from fused_birnn.tune import ATEN_MAX_TRAINING_STEPS


def pair(**kwargs):
    ours = fused_birnn.RNN(3, 4, 2, bidirectional=True, **kwargs)
    ref = torch.nn.RNN(3, 4, 2, bidirectional=True, **{k: v for k, v in kwargs.items() if k != "backend"})
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_inference_runs_atens_kernel_with_nn_rnns_results(aten_calls, nonlinearity):
    ours, ref = pair(nonlinearity=nonlinearity)
    x = torch.randn(40, 2, 3)
    with torch.no_grad():
        out, h_n = ours(x)
        packed_out, packed_h_n = ours(pack_sequence([torch.randn(n, 3) for n in (5, 2, 4)], enforce_sorted=False))
    assert aten_calls == [f"rnn_{nonlinearity}"] * 2
    ref_out, ref_h_n = ref(x)
    assert torch.equal(out, ref_out) and torch.equal(h_n, ref_h_n)


def test_short_training_sequences_run_aten_long_ones_our_path(aten_calls, monkeypatch):
    layers = []
    real_layer = rnn_module.birnn_layer
    monkeypatch.setattr(rnn_module, "birnn_layer", lambda *a: layers.append(1) or real_layer(*a))
    ours, ref = pair()
    for T, expect_aten in ((ATEN_MAX_TRAINING_STEPS - 1, True), (ATEN_MAX_TRAINING_STEPS, False)):
        aten_calls.clear()
        layers.clear()
        x = torch.randn(T, 2, 3, requires_grad=True)
        out, h_n = ours(x)
        (out.pow(2).sum() + h_n.sum()).backward()
        assert (aten_calls == ["rnn_tanh"]) == expect_aten and bool(layers) != expect_aten, T
        grads = [x.grad] + [p.grad for p in ours.parameters()]
        x.grad = None
        ours.zero_grad()
        ref_out, ref_h_n = ref(x)
        (ref_out.pow(2).sum() + ref_h_n.sum()).backward()
        torch.testing.assert_close(out, ref_out)
        for g, expected in zip(grads, [x.grad] + [p.grad for p in ref.parameters()]):
            torch.testing.assert_close(g, expected)
        x.grad = None
        ref.zero_grad()


def test_our_path_where_aten_does_not_serve(aten_calls):
    ours, _ = pair()
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        ours(x, lengths=torch.tensor([5, 3]))                     # lengths=: ours
        fused_birnn.RNN(3, 4, backend="torch")(x)                 # an explicit backend
        fused_birnn.RNN(3, 4, dtype=torch.float16)(x.half())      # a dtype ATen's CPU RNN is not asked for
        with torch.autocast("cpu", dtype=torch.bfloat16):         # autocast keeps our semantics
            ours(x)
    torch.func.vmap(ours)(torch.randn(2, 5, 2, 3))               # torch.func: our layer's rules
    assert aten_calls == []


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("given_hx", [False, True])
def test_fast_path_to_aten_equals_nn_and_keeps_nns_errors(cell, batch_first, given_hx, monkeypatch):
    """The call `_aten_fast_path` hands straight to ATen (no interpreter, batched CPU input): bitwise nn's
    outputs and gradients; a state of the wrong shape or dtype still raises what nn raises."""
    monkeypatch.setattr(functional, "INTERPRETER", False)
    ours_cls, ref_cls = getattr(fused_birnn, cell), getattr(torch.nn, cell)
    ours = ours_cls(3, 4, 2, bidirectional=True, batch_first=batch_first)
    ref = ref_cls(3, 4, 2, bidirectional=True, batch_first=batch_first)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, 3, requires_grad=True)
    h = torch.randn(4, 5 if batch_first else 6, 4)
    hx = ((h, torch.randn_like(h)) if cell == "LSTM" else h) if given_hx else None
    (out, state), (ref_out, ref_state) = ours(x, hx), ref(x, hx)
    states = state if isinstance(state, tuple) else (state,)
    ref_states = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(states, ref_states, strict=True))
    grads = torch.autograd.grad(out.sum(), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad(ref_out.sum(), [x, *ref.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    for bad in (h[:, :1], h.double(), h[:2]):
        bad_hx = (bad, torch.zeros_like(bad)) if cell == "LSTM" else bad
        assert outcome(lambda: ref(x, bad_hx))[1] is not None
        assert_same_outcome(outcome(lambda: ours(x, bad_hx)), outcome(lambda: ref(x, bad_hx)), f"{cell} bad hx")


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("given_hx", [False, True])
def test_fast_path_takes_packed_sequences_too(cell, given_hx, monkeypatch):
    """A PackedSequence (unsorted, states in the caller's order) through the fast path: bitwise nn's
    packed outputs, final states and gradients."""
    monkeypatch.setattr(functional, "INTERPRETER", False)
    ours = getattr(fused_birnn, cell)(3, 4, 2, bidirectional=True)
    ref = getattr(torch.nn, cell)(3, 4, 2, bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    seqs = [torch.randn(n, 3, requires_grad=True) for n in (2, 5, 3)]
    h = torch.randn(4, 3, 4)
    hx = ((h, torch.randn_like(h)) if cell == "LSTM" else h) if given_hx else None
    results = []
    for model in (ours, ref):
        out, state = model(pack_sequence(seqs, enforce_sorted=False), hx)
        states = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(out.data.sum() + sum(s.sum() for s in states), [*seqs, *model.parameters()])
        results.append([out.data, *states, *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
