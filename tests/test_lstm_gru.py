"""`fused_birnn.LSTM` and `fused_birnn.GRU` as drop-ins for `nn.LSTM` / `nn.GRU`: constructor, parameters and
`state_dict` both ways, forward results and gradients against the torch class in float64 (batched,
unbatched, batch_first, given states, proj_size, no bias, several layers), PackedSequence and `lengths=`,
every bad argument raising what torch raises, eval-mode backward, bitwise determinism, gradcheck, the
custom ops under opcheck and torch.compile(fullgraph=True), and the CPU dispatch of backend='auto' to
ATen's own kernels. The recurrence itself is tested against float64 in tests/test_torch_cells.py
(PyTorch path) and tests/test_kernels_gated*.py (kernels)."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, assert_same_outcome, outcome
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fused_birnn
from fused_birnn import functional
from fused_birnn import rnn as rnn_module

CLASSES = {"LSTM": (fused_birnn.LSTM, nn.LSTM), "GRU": (fused_birnn.GRU, nn.GRU)}
# (cell, constructor kwargs) covering projections, biases, depth and direction
CONFIGS = [
    ("LSTM", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)),
    ("LSTM", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", dict(input_size=1, hidden_size=7, num_layers=1, bidirectional=False, bias=False, proj_size=3)),
    ("GRU", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)),
    ("GRU", dict(input_size=1, hidden_size=7, num_layers=1, bidirectional=True, bias=False)),
]
CONFIG_IDS = ["lstm-2x5-bi", "lstm-proj2-bi", "lstm-I1-H7-proj3-uni-nobias", "gru-2x5-bi", "gru-I1-H7-nobias"]


def pair(cell, backend="auto", dtype=torch.float64, **kwargs):
    """Our module and the torch class holding the same parameters (ours initialised from the same seed)."""
    ours_cls, ref_cls = CLASSES[cell]
    torch.manual_seed(0)
    ours = ours_cls(**kwargs, backend=backend, dtype=dtype)
    torch.manual_seed(0)
    ref = ref_cls(**kwargs, dtype=dtype)
    return ours, ref


def states(cell, module, B, dtype=torch.float64):
    D = 2 if module.bidirectional else 1
    h0 = torch.randn(D * module.num_layers, B, module.proj_size or module.hidden_size, dtype=dtype)
    if cell == "LSTM":
        return h0, torch.randn(D * module.num_layers, B, module.hidden_size, dtype=dtype)
    return h0


def flat(result):
    """`(output, h_n)` or `(output, (h_n, c_n))` as a flat list of tensors."""
    out, hx = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return [out, *(hx if isinstance(hx, tuple) else (hx,))]


def requiring_grad(hx):
    return tuple(t.requires_grad_() for t in hx) if isinstance(hx, tuple) else hx.requires_grad_()


# ------------------------------------------------------------------------------------- constructor

@pytest.mark.parametrize("cell, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_parameters_initialisation_and_state_dict_match_nn(cell, kwargs):
    ours, ref = pair(cell, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{name}: initialised differently from nn.{cell}"
    ours_cls, ref_cls = CLASSES[cell]
    back = ref_cls(**kwargs, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())  # ours -> torch
    fresh = ours_cls(**kwargs, dtype=torch.float64)
    fresh.load_state_dict(ref.state_dict())  # torch -> ours
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), back.parameters()))


CONSTRUCTOR_CASES = [  # (id, cell, args, kwargs): each passed to nn's class and to ours
    ("lstm-proj-equal-hidden", "LSTM", (3, 4), dict(proj_size=4)),
    ("lstm-proj-negative", "LSTM", (3, 4), dict(proj_size=-1)),
    ("lstm-proj-float", "LSTM", (3, 4), dict(proj_size=2.0)),
    ("lstm-hidden-zero", "LSTM", (3, 0), {}),
    ("lstm-dropout-negative", "LSTM", (3, 4, 2), dict(dropout=-0.1)),
    ("lstm-unknown-keyword", "LSTM", (3, 4), dict(nonlinearity="relu")),
    ("lstm-valid-positional", "LSTM", (3, 4, 2, False, True, 0.0, True, 2), {}),
    ("gru-proj", "GRU", (3, 4), dict(proj_size=2)),
    ("gru-proj-positional", "GRU", (3, 4, 1, True, False, 0.0, True, 2), {}),
    ("gru-input-zero", "GRU", (0, 4), {}),
    ("gru-layers-float", "GRU", (3, 4, 1.5), {}),
    ("gru-valid-keywords", "GRU", (), dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("cell, args, kwargs", [c[1:] for c in CONSTRUCTOR_CASES], ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_errors_match_nn(cell, args, kwargs):
    ours_cls, ref_cls = CLASSES[cell]
    ours, ref = assert_same_outcome(outcome(lambda: ours_cls(*args, **kwargs)), outcome(lambda: ref_cls(*args, **kwargs)),
                                    f"{cell}{args}, {kwargs}")
    if ref is not None:
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend"):
        fused_birnn.LSTM(3, 4, backend="cudnn")


# ---------------------------------------------------------------------------------- forward parity

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cell, kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", ["batched", "batch_first", "unbatched", "no-hx"])
def test_forward_and_gradients_match_nn(cell, kwargs, layout, backend):
    """Outputs, final states and every gradient (input, states, parameters) equal nn's in float64."""
    ours, ref = pair(cell, backend, batch_first=layout == "batch_first", **kwargs)
    T, B = 4, 3
    shape = {"batched": (T, B), "batch_first": (B, T), "unbatched": (T,), "no-hx": (T, B)}[layout]
    x = torch.randn(*shape, kwargs["input_size"], dtype=torch.float64, requires_grad=True)
    hx = None if layout == "no-hx" else states(cell, ours, B)
    if layout == "unbatched":
        hx = tuple(t[:, 0] for t in hx) if cell == "LSTM" else hx[:, 0]
    if hx is not None:
        hx = requiring_grad(hx)
    got, want = flat(ours(x, hx)), flat(ref(x, hx))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_close(g, w, torch.float64, f"{cell} {layout}")
    upstream = [torch.randn_like(w) for w in want]
    inputs = [x, *([] if hx is None else (hx if isinstance(hx, tuple) else (hx,)))]
    grads = torch.autograd.grad(got, inputs + list(ours.parameters()), upstream)
    ref_grads = torch.autograd.grad(want, inputs + list(ref.parameters()), upstream)
    names = ["x", *(["h0", "c0"][:len(inputs) - 1])] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, grads, ref_grads, strict=True):
        assert_close(g, w, torch.float64, f"{cell} {layout} grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell, kwargs", CONFIGS[1:2] + CONFIGS[3:4], ids=["lstm-proj2-bi", "gru-2x5-bi"])
def test_kernel_backends_match_nn_in_float32(cell, kwargs, backend):
    """The layer under `backend` (the Triton kernels through the interpreter, or the PyTorch path) in
    float32 against nn's class in float64."""
    ours, ref = pair(cell, backend, dtype=torch.float32, **kwargs)
    ref = ref.double()
    x = torch.randn(5, 3, kwargs["input_size"], requires_grad=True)
    got = flat(ours(x))
    want = flat(ref(x.double()))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32, cell)
    grads = torch.autograd.grad(sum(g.sum() for g in got), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad(sum(w.sum() for w in want), [x, *ref.parameters()])
    for g, w in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cell, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_packed_sequence_and_lengths_match_nn_packed(cell, kwargs, backend):
    """A PackedSequence (unsorted) gives nn's packed results; `lengths=` on the padded batch gives the
    same, with padded output steps 0, and the same gradients."""
    ours, ref = pair(cell, backend, **kwargs)
    lengths = torch.tensor([2, 5, 1, 4])
    x = torch.randn(5, 4, kwargs["input_size"], dtype=torch.float64, requires_grad=True)
    hx = requiring_grad(states(cell, ours, 4))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    ref_out, ref_hx = ref(packed, hx)
    ours_out, ours_hx = ours(packed, hx)
    for g, w in zip(flat((ours_out, ours_hx)), flat((ref_out, ref_hx)), strict=True):
        assert_close(g, w, torch.float64, f"{cell} packed")
    padded_ref, _ = pad_packed_sequence(ref_out, total_length=5)
    out, hx_n = ours(x, hx, lengths=lengths)
    assert_close(out, padded_ref, torch.float64, f"{cell} lengths=")
    for g, w in zip(flat((out, hx_n))[1:], flat((ref_out, ref_hx))[1:], strict=True):
        assert_close(g, w, torch.float64, f"{cell} lengths= final states")
    upstream = torch.randn_like(out)
    inputs = [x, *(hx if isinstance(hx, tuple) else (hx,))]
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(padded_ref, inputs, upstream)
    for g, w in zip(grads, ref_grads, strict=True):
        assert_close(g, w, torch.float64, f"{cell} lengths= gradients")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_gradcheck_through_the_layer(cell):
    ours, _ = pair(cell, "torch", input_size=2, hidden_size=3, bidirectional=True,
                   **({"proj_size": 2} if cell == "LSTM" else {}))
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    hx = requiring_grad(states(cell, ours, 2))
    hx_list = list(hx) if isinstance(hx, tuple) else [hx]

    def run(x, *hx):
        return tuple(flat(ours(x, tuple(hx) if cell == "LSTM" else hx[0])))

    assert torch.autograd.gradcheck(run, (x, *hx_list))
    assert torch.autograd.gradgradcheck(run, (x, *hx_list))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_backward_in_eval_mode_and_bitwise_determinism(cell):
    ours, _ = pair(cell, "torch", input_size=3, hidden_size=4, num_layers=2, bidirectional=True, dropout=0.5)
    ours.eval()
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for _ in range(2):
        out = flat(ours(x))
        grads = torch.autograd.grad(sum((o * o).sum() for o in out), [x, *ours.parameters()])
        results.append(out + list(grads))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# -------------------------------------------------------------------------------------- bad inputs

FORWARD_CASES = [  # (id, cell, input factory, hx factory) for <cell>(4, 5, 2, bidirectional=True)
    ("input-1d", "LSTM", lambda: torch.randn(4), None),
    ("input-4d", "GRU", lambda: torch.randn(3, 2, 4, 1), None),
    ("input-features", "LSTM", lambda: torch.randn(3, 2, 6), None),
    ("input-dtype", "GRU", lambda: torch.randn(3, 2, 4, dtype=torch.float64), None),
    ("lstm-hx-tensor", "LSTM", lambda: torch.randn(3, 2, 4), lambda: torch.zeros(4, 2, 5)),
    ("lstm-hx-2d-for-batched", "LSTM", lambda: torch.randn(3, 2, 4), lambda: (torch.zeros(4, 5), torch.zeros(4, 5))),
    ("lstm-hx-3d-for-unbatched", "LSTM", lambda: torch.randn(3, 4),
     lambda: (torch.zeros(4, 1, 5), torch.zeros(4, 1, 5))),
    ("lstm-h0-size", "LSTM", lambda: torch.randn(3, 2, 4), lambda: (torch.zeros(4, 2, 6), torch.zeros(4, 2, 5))),
    ("lstm-c0-size", "LSTM", lambda: torch.randn(3, 2, 4), lambda: (torch.zeros(4, 2, 5), torch.zeros(4, 3, 5))),
    ("lstm-c0-layers", "LSTM", lambda: torch.randn(3, 2, 4), lambda: (torch.zeros(4, 2, 5), torch.zeros(2, 2, 5))),
    ("gru-hx-2d-for-batched", "GRU", lambda: torch.randn(3, 2, 4), lambda: torch.zeros(4, 5)),
    ("gru-hx-size", "GRU", lambda: torch.randn(3, 2, 4), lambda: torch.zeros(4, 2, 6)),
    ("gru-hx-tuple", "GRU", lambda: torch.randn(3, 2, 4), lambda: (torch.zeros(4, 2, 5),)),
    ("valid-unbatched", "LSTM", lambda: torch.randn(3, 4), lambda: (torch.zeros(4, 5), torch.zeros(4, 5))),
    ("valid-packed", "GRU", lambda: pack_sequence([torch.randn(n, 4) for n in (3, 1)], enforce_sorted=False), None),
]


@pytest.mark.parametrize("cell, make_input, make_hx", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_forward_errors_match_nn(cell, make_input, make_hx):
    ours, ref = pair(cell, "torch", dtype=torch.float32, input_size=4, hidden_size=5, num_layers=2,
                     bidirectional=True)
    x = make_input()
    hx = None if make_hx is None else make_hx()
    got, want = assert_same_outcome(outcome(lambda: ours(x, hx)), outcome(lambda: ref(x, hx)), cell)
    if want is not None:
        for g, w in zip(flat(got), flat(want), strict=True):
            assert_close(g, w, torch.float32, cell)


def _packed(dtype, sorted_=False, I=4):
    seqs = [torch.randn(n, I, dtype=dtype) for n in ((3, 2) if sorted_ else (2, 3))]
    return pack_sequence(seqs, enforce_sorted=sorted_)


def _h(*shape, dtype=torch.float64):
    return torch.zeros(*shape, dtype=dtype)


# Bad LSTM states and what nn.LSTM raises for them here (the type depends on what hx holds, on the input being
# padded, unbatched or packed, sorted or not, and on the torch version): (id, module dtype, input, hx) for
# LSTM(4, 5, 2, bidirectional=True), whose states are [4, B, 5]
LSTM_STATE_CASES = [
    ("tensor-padded", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: _h(4, 2, 5)),
    ("tensor-unbatched", torch.float64, lambda: torch.randn(3, 4, dtype=torch.float64), lambda: _h(4, 5)),
    ("tensor-packed-sorted", torch.float64, lambda: _packed(torch.float64, True), lambda: _h(4, 2, 5)),
    ("tensor-packed", torch.float64, lambda: _packed(torch.float64), lambda: _h(4, 2, 5)),
    ("1-tuple-padded", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: (_h(4, 2, 5),)),
    ("1-tuple-unbatched", torch.float64, lambda: torch.randn(3, 4, dtype=torch.float64), lambda: (_h(4, 5),)),
    ("1-tuple-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(4, 2, 5),)),
    ("1-list-padded", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: [_h(4, 2, 5)]),
    ("3-tuple-padded", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: (_h(4, 2, 5),) * 3),
    ("none-h-padded", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: (None, _h(4, 2, 5))),
    ("none-c-unbatched", torch.float64, lambda: torch.randn(3, 4, dtype=torch.float64), lambda: (_h(4, 5), None)),
    ("none-h-packed-sorted", torch.float64, lambda: _packed(torch.float64, True), lambda: (None, _h(4, 2, 5))),
    ("none-c-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(4, 2, 5), None)),
    ("int", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: 3),
    ("str", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: "hc"),
    ("2d-packed-sorted", torch.float64, lambda: _packed(torch.float64, True), lambda: (_h(4, 5), _h(4, 5))),
    ("2d-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(4, 5), _h(4, 5))),
    ("2d-c-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(4, 2, 5), _h(4, 5))),
    ("1d-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(5), _h(5))),
    ("fp32-packed-into-fp64", torch.float64, lambda: _packed(torch.float32), None),
    ("fp32-packed-into-fp64-with-states", torch.float64, lambda: _packed(torch.float32), lambda: (_h(4, 2, 5),) * 2),
    ("fp32-padded-into-fp64", torch.float64, lambda: torch.randn(3, 2, 4), None),
    ("valid-packed", torch.float64, lambda: _packed(torch.float64), lambda: (_h(4, 2, 5), _h(4, 2, 5))),
    ("valid-list", torch.float64, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: [_h(4, 2, 5)] * 2),
]


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("dtype, make_input, make_hx", [c[1:] for c in LSTM_STATE_CASES],
                         ids=[c[0] for c in LSTM_STATE_CASES])
def test_lstm_bad_states_raise_what_nn_lstm_raises(dtype, make_input, make_hx, backend):
    """Ours raises an instance of nn.LSTM's exception type (StateError is a RuntimeError, TypeError,
    IndexError and AttributeError; InputDtypeError a ValueError and RuntimeError), on every backend."""
    ours, ref = pair("LSTM", backend, dtype=dtype, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    x = make_input()
    hx = None if make_hx is None else make_hx()
    got, want = assert_same_outcome(outcome(lambda: ours(x, hx)), outcome(lambda: ref(x, hx)), "LSTM state")
    if want is not None:
        for g, w in zip(flat(got), flat(want), strict=True):
            assert_close(g, w, dtype, "LSTM state")


def test_lstm_state_error_names_the_tuple():
    ours = fused_birnn.LSTM(4, 5)
    with pytest.raises(RuntimeError, match=r"\(h_0, c_0\)"):
        ours(torch.randn(3, 2, 4), torch.zeros(1, 2, 5))


# ------------------------------------------------------------------------------ ops and compilation

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell, kwargs, lengths", [
    ("LSTM", dict(proj_size=2), [3, 1]),
    ("LSTM", dict(bias=False), None),
    ("GRU", {}, [2, 3]),
], ids=["lstm-proj-lengths", "lstm-nobias", "gru-lengths"])
def test_opcheck(cell, kwargs, lengths, backend):
    """torch.library.opcheck of the forward op and of the backward op for every combination of input and
    weight gradients."""
    module = CLASSES[cell][0](3, 4, bidirectional=True, dtype=torch.float64, **kwargs)
    params = [p.detach().clone().requires_grad_() for ps in module._layer_params(0) for p in ps]
    P = module.proj_size or 4
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, P, dtype=torch.float64, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths)
    if cell == "LSTM":
        c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
        op, args = functional.lstm_layer, (x, h0, c0, params, lengths, backend)
    else:
        c0 = None
        op, args = functional.gru_layer, (x, h0, params, lengths, backend)
    assert torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS) == {u: "SUCCESS" for u in OPCHECK_UTILS}
    out, h_n, *rest = op(*args)
    saved = rest[-1]
    detached = [t.detach() for t in (x, h0)]
    for input_grad, weight_grads in [(True, True), (False, True), (True, False)]:
        if cell == "LSTM":
            bwd = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(rest[0]), *detached, c0.detach(),
                   out.detach(), saved.detach(), [p.detach() for p in params], lengths, backend, input_grad,
                   weight_grads)
            bwd_op = functional.lstm_layer_backward_op
        else:
            bwd = (torch.randn_like(out), torch.randn_like(h_n), *detached, out.detach(), saved.detach(),
                   [p.detach() for p in params], lengths, backend, input_grad, weight_grads)
            bwd_op = functional.gru_layer_backward_op
        result = torch.library.opcheck(bwd_op, bwd, test_utils=OPCHECK_UTILS[:1] + OPCHECK_UTILS[2:])
        assert all(v == "SUCCESS" for v in result.values())


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_compile_fullgraph_forward_and_backward_equal_eager(cell):
    """torch.compile(fullgraph=True) with lengths=: no graph break, the cell's ops in the graph, eager's
    outputs and gradients."""
    ours, _ = pair(cell, "torch", input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                   **({"proj_size": 2} if cell == "LSTM" else {}))
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])

    def run(x):
        out, hx = ours(x, lengths=lengths)
        return out, hx

    torch._dynamo.reset()
    explained = torch._dynamo.explain(run)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got, want = flat(compiled(x)), flat(run(x))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float64, f"{cell} compiled")
    upstream = [torch.randn_like(w) for w in want]
    g_compiled = torch.autograd.grad(got, [x, *ours.parameters()], upstream)
    g_eager = torch.autograd.grad(want, [x, *ours.parameters()], upstream)
    for g, w in zip(g_compiled, g_eager, strict=True):
        assert_close(g, w, torch.float64, f"{cell} compiled gradients")


# --------------------------------------------------------------------------------- CPU dispatch

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cpu_auto_runs_atens_kernel_including_training_and_lengths(cell, monkeypatch):
    """Without the interpreter, backend='auto' on a CPU runs ATen's kernel for the cell (nn's speed) in
    inference and training, `lengths=` through its packed form; bitwise nn's results."""
    monkeypatch.setattr(functional, "INTERPRETER", False)
    layers = []
    real_layer = rnn_module.birnn_layer
    monkeypatch.setattr(rnn_module, "birnn_layer", lambda *a: layers.append(1) or real_layer(*a))
    ours, ref = pair(cell, "auto", dtype=torch.float32, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(40, 2, 3, requires_grad=True)
    got, want = flat(ours(x)), flat(ref(x))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    lengths = torch.tensor([40, 17])
    out, _ = ours(x, lengths=lengths)
    ref_out, _ = pad_packed_sequence(ref(pack_padded_sequence(x, lengths, enforce_sorted=False))[0], total_length=40)
    assert torch.equal(out, ref_out)
    assert layers == [], "backend='auto' on a CPU without the interpreter ran our layer"
    ours.backend = "torch"
    ours(x)
    assert len(layers) == 2


# ------------------------------------------------------------------- autocast, long sequences, CUDA

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cpu_bf16_autocast_like_nn(cell, backend):
    """Under CPU bf16 autocast: nn's output dtypes (fp32 parameter gradients), and against float64 an
    error no worse than twice nn's own plus a small floor."""
    ours, ref = pair(cell, backend, dtype=torch.float32, input_size=3, hidden_size=6, num_layers=2,
                     bidirectional=True)
    ref64 = CLASSES[cell][1](3, 6, 2, bidirectional=True, dtype=torch.float64)
    ref64.load_state_dict(ours.state_dict())
    x = torch.randn(5, 4, 3)

    def run(model, x, autocast):
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = flat(model(x))
        grads = torch.autograd.grad(sum(o.double().sum() for o in out), [x, *model.parameters()])
        return out + list(grads)

    got, theirs, exact = run(ours, x, True), run(ref, x, True), run(ref64, x.double(), False)
    assert [t.dtype for t in got] == [t.dtype for t in theirs]
    for i, (a, b, e) in enumerate(zip(got, theirs, exact, strict=True)):
        scale = e.abs().max().item() + 1e-30
        err_ours, err_theirs = [(t.double() - e).abs().max().item() / scale for t in (a, b)]
        assert err_ours <= 2 * err_theirs + 1e-2, f"tensor {i}: ours {err_ours:.2e}, nn {err_theirs:.2e}"


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_sequence_past_cudnns_limit_on_the_pytorch_path(cell):
    """T = 66,000 (cuDNN refuses T >= 65,536) forward and backward on the PyTorch path, checked at both
    ends against short runs (contractive weights: the first steps forget the initial state)."""
    m = CLASSES[cell][0](2, 3, 1, bidirectional=True, dtype=torch.float64, backend="torch")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(0.3)
    T = 66_000
    x = torch.randn(T, 1, 2, dtype=torch.float64, requires_grad=True)
    out, hx = m(x)
    assert out.shape == (T, 1, 6) and torch.isfinite(out).all()
    head, _ = m(x[:40].detach())
    torch.testing.assert_close(out[:40, :, :3], head[:, :, :3])
    tail, _ = m(x[-40:].detach())
    torch.testing.assert_close(out[-40:, :, 3:], tail[:, :, 3:])
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("cell, packed, expected", [
    ("LSTM", False, torch.bfloat16), ("LSTM", True, torch.float32), ("GRU", False, torch.float32),
    ("GRU", True, torch.float32)], ids=["lstm-padded", "lstm-packed", "gru-padded", "gru-packed"])
def test_cpu_autocast_dtype_follows_nn(cell, packed, expected):
    """Where nn's class runs in autocast's dtype on a CPU and where it stays fp32 (torch 2.13): ours the
    same, `lengths=` as packed."""
    ours, ref = pair(cell, "torch", dtype=torch.float32, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(5, 2, 3)
    lengths = torch.tensor([5, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = ref(pack_padded_sequence(x, lengths) if packed else x)[0]
        out = ours(x, lengths=lengths if packed else None)[0]
        packed_out = ours(pack_padded_sequence(x, lengths))[0] if packed else None
    ref_dtype = ref_out.data.dtype if packed else ref_out.dtype
    assert ref_dtype == expected, "nn's autocast behaviour changed: update FusedRNNBase._autocast_dtype"
    assert out.dtype == expected and (packed_out is None or packed_out.data.dtype == expected)


# ------------------------------------------------------------------ transforms, tracing, empty batch

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_vmap_and_func_grad_match_a_loop(cell):
    """torch.func.vmap over samples and torch.func.grad through the layer: the same as a Python loop
    over the samples with nn's class."""
    ours, ref = pair(cell, "auto", input_size=3, hidden_size=4, bidirectional=True,
                     **({"proj_size": 2} if cell == "LSTM" else {}))
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)  # 3 samples of [T=5, B=2, I=3]
    batched = torch.func.vmap(lambda x: ours(x)[0])(xs)
    looped = torch.stack([ref(x)[0] for x in xs])
    assert_close(batched, looped, torch.float64, f"{cell} vmap")
    params = dict(ours.named_parameters())

    def loss(params, x):
        return torch.func.functional_call(ours, params, (x,))[0].square().sum()

    grads = torch.func.grad(loss)(params, xs[0])
    ref_grads = torch.autograd.grad(ref(xs[0])[0].square().sum(), list(ref.parameters()))
    for (name, g), w in zip(grads.items(), ref_grads, strict=True):
        assert_close(g, w, torch.float64, f"{cell} func.grad {name}")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_empty_batch_like_nn(cell):
    ours, ref = pair(cell, "auto", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    got, want = flat(ours(x)), flat(ref(x))
    assert [g.shape for g in got] == [w.shape for w in want]
    sum(g.sum() for g in got).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_jit_trace_records_the_cells_op(cell):
    ours, _ = pair(cell, "torch", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    assert str(traced.graph).count(f"fused_birnn::{cell.lower()}_layer") == 2
    other = torch.randn(7, 3, 3, dtype=torch.float64)
    for g, w in zip(flat(traced(other)), flat(ours(other)), strict=True):
        assert_close(g, w, torch.float64, f"{cell} traced")
