"""ONNX export (each layer one ONNX `RNN` / `LSTM` / `GRU` node, run by onnxruntime against eager
fused_birnn and torch.nn on the same weights) and TorchScript (a clear error naming `fused_birnn.to_torch`)."""

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fused_birnn

ATOL, RTOL = 1e-5, 1e-5  # fp32: onnxruntime's RNN kernel against ours and ATen's


@pytest.fixture
def ort():
    """onnxruntime, with onnx and onnxscript (the `export` extra); the test is skipped without them."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def export(model, args, **kwargs):
    """`fused_birnn.export.to_onnx`, quiet, with the ONNX checker run on the result."""
    import onnx

    program = fused_birnn.export.to_onnx(model, args, verbose=False, **kwargs)
    onnx.checker.check_model(program.model_proto, full_check=True)
    return program


def run(ort, program, *inputs):
    """The exported model on onnxruntime's CPU provider; inputs in the graph's input order."""
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), names
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def op_types(program):
    return [node.op_type for node in program.model_proto.graph.node]


def assert_rnn_nodes(program, num_layers):
    """One ONNX RNN node per layer, and no loop in the graph."""
    ops = op_types(program)
    assert ops.count("RNN") == num_layers, ops
    assert not {"Loop", "Scan", "If"} & set(ops), ops


def close(actual, expected, msg):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{msg}: {m}")


def pair(*args, **kwargs):
    """A fused_birnn.RNN in eval mode and an nn.RNN with the same weights."""
    ours = fused_birnn.RNN(*args, **kwargs).eval()
    ref = nn.RNN(*args, **kwargs).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


class WithH0(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0):
        return self.rnn(x, h0)


def test_import_does_not_load_onnx():
    """onnx, onnxscript and onnxruntime are an optional extra: `import fused_birnn` must not need them."""
    code = ("import sys, fused_birnn; loaded = [m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir')]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


# (num_layers, bidirectional, nonlinearity, bias, batch_first, with h0): every value of each with others
CASES = [
    (1, True, "tanh", True, False, False),
    (1, False, "relu", True, True, True),
    (1, True, "tanh", False, False, True),
    (3, True, "relu", False, True, True),
    (3, False, "tanh", False, False, False),
    (3, True, "tanh", True, True, False),
]


@pytest.mark.parametrize("layers,bidirectional,nonlinearity,bias,batch_first,with_h0", CASES)
def test_onnx_matches_eager(ort, layers, bidirectional, nonlinearity, bias, batch_first, with_h0):
    I, H, B, T = 4, 6, 3, 5
    D = 2 if bidirectional else 1
    ours, ref = pair(I, H, layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional)
    shape = (B, T, I) if batch_first else (T, B, I)
    model = WithH0(ours) if with_h0 else ours
    example = (torch.randn(shape),) + ((torch.randn(D * layers, B, H),) if with_h0 else ())
    program = export(model, example)
    assert_rnn_nodes(program, layers)

    inputs = (torch.randn(shape),) + ((torch.randn(D * layers, B, H),) if with_h0 else ())  # fresh values
    out, h_n = run(ort, program, *inputs)
    with torch.no_grad():
        ours_out, ours_h = ours(*inputs)
        ref_out, ref_h = ref(*inputs)
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape
    close(out, ours_out, "output vs fused_birnn")
    close(h_n, ours_h, "h_n vs fused_birnn")
    close(out, ref_out, "output vs nn.RNN")
    close(h_n, ref_h, "h_n vs nn.RNN")


class Tagger(nn.Module):
    """A Linear before the RNN and one after it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 4)
        self.rnn = fused_birnn.RNN(4, 5, 2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        out, h_n = self.rnn(torch.tanh(self.embed(x)))
        return self.head(out), h_n


def test_onnx_model_around_rnn_dynamic_axes(ort):
    """The documented plain `torch.onnx.export(..., custom_translation_table=...)`, with batch and time
    dynamic: one export serves other shapes, against the eager model and its nn.RNN twin."""
    model = Tagger().eval()
    twin = fused_birnn.to_torch(copy.deepcopy(model))
    assert isinstance(twin.rnn, nn.RNN)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    program = torch.onnx.export(model, (torch.randn(3, 6, 7),), verbose=False,
                                dynamic_shapes={"x": {0: batch, 1: time}},
                                custom_translation_table=fused_birnn.export.onnx_translation_table())
    assert_rnn_nodes(program, 2)
    for B, T in [(3, 6), (1, 9), (5, 2)]:
        x = torch.randn(B, T, 7)
        y, h_n = run(ort, program, x)
        with torch.no_grad():
            for name, m in (("fused_birnn", model), ("nn.RNN", twin)):
                y_ref, h_ref = m(x)
                close(y, y_ref, f"B={B} T={T} head output vs {name}")
                close(h_n, h_ref, f"B={B} T={T} h_n vs {name}")


class WithLengths(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        return self.rnn(x, lengths=lengths)


def test_onnx_lengths_as_sequence_lens(ort):
    """`lengths=` becomes ONNX's `sequence_lens`; onnxruntime then has our semantics: padded outputs 0,
    each reverse row starting at its own last valid step, h_n at each row's own last step. Checked
    against eager with lengths and against nn.RNN on the packed batch, at shapes other than exported."""
    ours, ref = pair(4, 5, 2, batch_first=True, bidirectional=True)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    program = export(WithLengths(ours), (torch.randn(3, 6, 4), torch.tensor([6, 2, 4])),
                     dynamic_shapes={"x": {0: batch, 1: time}, "lengths": {0: batch}})
    assert_rnn_nodes(program, 2)
    assert "sequence_lens" not in op_types(program)  # (an input of RNN, not a node)
    rnn_inputs = [n for n in program.model_proto.graph.node if n.op_type == "RNN"][0].input
    assert len(rnn_inputs) >= 5 and rnn_inputs[4], "sequence_lens must be wired"
    for lengths in (torch.tensor([9, 1, 4, 9, 6]), torch.tensor([2, 7, 1])):
        T = int(lengths.max())
        x = torch.randn(len(lengths), T, 4)
        out, h_n = run(ort, program, x, lengths)
        for b, n in enumerate(lengths.tolist()):
            assert (out[b, n:] == 0).all(), f"padded steps of row {b} must be 0"
        with torch.no_grad():
            ours_out, ours_h = ours(x, lengths=lengths)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            ref_packed, ref_h = ref(packed)
            ref_out, _ = pad_packed_sequence(ref_packed, batch_first=True, total_length=T)
        close(out, ours_out, "output vs fused_birnn with lengths")
        close(h_n, ours_h, "h_n vs fused_birnn with lengths")
        close(out, ref_out, "output vs nn.RNN packed")
        close(h_n, ref_h, "h_n vs nn.RNN packed")


def test_onnx_refuses_packed_sequence_and_dynamo_false(ort):
    rnn = fused_birnn.RNN(4, 5, bidirectional=True).eval()
    packed = pack_sequence([torch.randn(n, 4) for n in (3, 2)])
    with pytest.raises(ValueError, match="PackedSequence.*lengths="):
        fused_birnn.export.to_onnx(rnn, (packed,))
    with pytest.raises(ValueError, match="dynamo=True.*fused_birnn.to_torch"):
        fused_birnn.export.to_onnx(rnn, (torch.randn(3, 2, 4),), dynamo=False)


@pytest.mark.parametrize("cell,kwargs", [("RNN", {}), ("LSTM", {"proj_size": 2}), ("GRU", {})])
def test_torchscript_script_names_to_torch(cell, kwargs):
    """torch.jit.script fails at once, naming the conversion back to torch.nn, which then scripts."""
    model = nn.Sequential(nn.Linear(3, 4), getattr(fused_birnn, cell)(4, 5, 2, bidirectional=True, **kwargs)).eval()
    for target in (model, model[1]):
        with pytest.raises(RuntimeError, match=r"fused_birnn\.to_torch\(model\)"):
            torch.jit.script(target)
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        expected = flat(model(x))
    scripted = torch.jit.script(fused_birnn.to_torch(model))
    assert type(model[1]) is getattr(nn, cell)
    with torch.no_grad():
        for got, want in zip(flat(scripted(x)), expected):
            close(got, want, f"{cell} scripted after to_torch")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_trace_records_the_op():
    """torch.jit.trace records one `fused_birnn::rnn_layer` per layer: the trace runs other shapes,
    differentiates, and survives save/load."""
    rnn, ref = pair(4, 5, 2, batch_first=True, bidirectional=True)
    traced = torch.jit.trace(rnn, (torch.randn(3, 6, 4),))
    assert str(traced.graph).count("fused_birnn::rnn_layer") == 2
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(5, 9, 4, requires_grad=True)
    for m in (traced, loaded):
        out, h_n = m(x)
        ref_out, ref_h = ref(x)
        close(out, ref_out, "traced output vs nn.RNN")
        close(h_n, ref_h, "traced h_n vs nn.RNN")
        (grad,) = torch.autograd.grad(out.sum() + h_n.sum(), x)
        (ref_grad,) = torch.autograd.grad(ref_out.sum() + ref_h.sum(), x)
        close(grad, ref_grad, "traced grad x vs nn.RNN")


# ------------------------------------------------------------------------------------ LSTM and GRU

def gated_pair(cell, *args, **kwargs):
    """A fused_birnn.LSTM / GRU in eval mode and its torch.nn twin with the same weights."""
    ours = getattr(fused_birnn, cell)(*args, **kwargs).eval()
    ref = getattr(nn, cell)(*args, **kwargs).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


class WithState(nn.Module):
    """`rnn(x, hx, lengths=...)` with the state as plain tensor inputs: `(h0, c0)` for an LSTM."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0, c0=None, lengths=None):
        out, state = self.rnn(x, h0 if c0 is None else (h0, c0), lengths=lengths)
        return (out, *state) if isinstance(state, tuple) else (out, state)


def flat(result):
    """`(out, h_n)` or `(out, (h_n, c_n))` -> a flat list of tensors, as the ONNX graph returns them."""
    out, state = result
    return [out, *state] if isinstance(state, tuple) else [out, state]


def assert_cell_nodes(program, cell, num_layers):
    """One ONNX LSTM / GRU node per layer (GRU in PyTorch's linear_before_reset form), no loop, translated
    from our op (not from an aten.lstm / aten.gru, which torch's exporter would also turn into LSTM/GRU)."""
    traced = [n.target for n in program.exported_program.graph.nodes if n.op == "call_function"]
    assert traced.count(getattr(torch.ops.fused_birnn, f"{cell.lower()}_layer").default) == num_layers, traced
    nodes = [n for n in program.model_proto.graph.node if n.op_type == cell]
    assert len(nodes) == num_layers, op_types(program)
    assert not {"Loop", "Scan", "If", "RNN"} & set(op_types(program)), op_types(program)
    if cell == "GRU":
        assert all({a.name: a.i for a in n.attribute}.get("linear_before_reset") == 1 for n in nodes)


# (cell, num_layers, bidirectional, bias, batch_first, with the state): each value of each with others
GATED_CASES = [
    ("LSTM", 1, True, True, False, True),
    ("LSTM", 2, False, False, True, False),
    ("LSTM", 2, True, True, True, True),
    ("GRU", 1, False, True, True, True),
    ("GRU", 2, True, False, False, False),
]


@pytest.mark.parametrize("cell,layers,bidirectional,bias,batch_first,with_state", GATED_CASES)
def test_onnx_lstm_gru_match_eager(ort, cell, layers, bidirectional, bias, batch_first, with_state):
    """One ONNX LSTM / GRU node per layer: the gate blocks permuted into ONNX's order (i,o,f,c / z,r,h),
    biases as [Wb, Rb], run by onnxruntime with fresh inputs against eager ours and torch.nn."""
    I, H, B, T = 3, 7, 5, 4  # odd sizes: a wrong block permutation cannot hide in symmetric shapes
    D = 2 if bidirectional else 1
    ours, ref = gated_pair(cell, I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)

    def inputs():
        x = torch.randn((B, T, I) if batch_first else (T, B, I))
        if not with_state:
            return (x,)
        return (x, torch.randn(D * layers, B, H)) + ((torch.randn(D * layers, B, H),) if cell == "LSTM" else ())

    program = export(WithState(ours) if with_state else ours, inputs())
    assert_cell_nodes(program, cell, layers)
    fresh = inputs()
    got = run(ort, program, *fresh)
    state = None if not with_state else (fresh[1] if cell == "GRU" else (fresh[1], fresh[2]))
    with torch.no_grad():
        for name, m in (("fused_birnn", ours), ("torch.nn", ref)):
            expected = flat(m(fresh[0], state))
            assert [g.shape for g in got] == [e.shape for e in expected]
            for what, g, e in zip(("output", "h_n", "c_n"), got, expected):
                close(g, e, f"{cell} {what} vs {name}")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_lstm_gru_lengths_as_sequence_lens(ort, cell):
    """`lengths=` becomes `sequence_lens`: padded outputs 0, each reverse row from its own last valid step,
    h_n (and c_n) at each row's own last step; batch and time dynamic. Against eager with lengths and
    torch.nn on the packed batch, at shapes other than exported."""
    ours, ref = gated_pair(cell, 3, 5, 2, batch_first=True, bidirectional=True)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    states = 2 if cell == "LSTM" else 1
    example = (torch.randn(3, 6, 3),) + tuple(torch.randn(4, 3, 5) for _ in range(states))
    dynamic = {"x": {0: batch, 1: time}, "h0": {1: batch}, **({"c0": {1: batch}} if states == 2 else {}),
               "lengths": {0: batch}}
    program = export(WithState(ours), example, kwargs={"lengths": torch.tensor([6, 2, 4])},
                     dynamic_shapes=dynamic)
    assert_cell_nodes(program, cell, 2)
    node = [n for n in program.model_proto.graph.node if n.op_type == cell][0]
    assert len(node.input) >= 5 and node.input[4], "sequence_lens must be wired"
    lengths = torch.tensor([9, 1, 4, 9, 6])
    x = torch.randn(5, 9, 3)
    state = tuple(torch.randn(4, 5, 5) for _ in range(states))
    got = run(ort, program, x, *state, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert (got[0][b, n:] == 0).all(), f"padded steps of row {b} must be 0"
    hx = state if cell == "LSTM" else state[0]
    with torch.no_grad():
        mine = flat(ours(x, hx, lengths=lengths))
        packed_out, ref_state = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx)
        theirs = flat((pad_packed_sequence(packed_out, batch_first=True, total_length=9)[0], ref_state))
    for what, g, e, r in zip(("output", "h_n", "c_n"), got, mine, theirs):
        close(g, e, f"{cell} {what} vs fused_birnn with lengths")
        close(g, r, f"{cell} {what} vs torch.nn packed")


def test_onnx_lstm_proj_size_is_refused_by_name(ort):
    """ONNX's LSTM has no projection: to_onnx refuses before tracing, naming the module and the limit;
    plain torch.onnx.export with our table fails in the translation with the same explanation."""
    model = nn.Sequential(nn.Linear(3, 4), fused_birnn.LSTM(4, 6, 2, proj_size=3, bidirectional=True)).eval()
    x = torch.randn(5, 2, 3)
    with pytest.raises(NotImplementedError, match=r"proj_size=3 \(at '1'\).*ONNX's LSTM operator has no projection"):
        fused_birnn.export.to_onnx(model, (x,))
    with pytest.raises(Exception, match=r"proj_size=3 cannot be exported to ONNX"):
        torch.onnx.export(model, (x,), verbose=False,
                          custom_translation_table=fused_birnn.export.onnx_translation_table())
    unprojected = fused_birnn.LSTM(4, 6).eval()  # the check looks at proj_size, not at the class
    assert_cell_nodes(export(unprojected, (torch.randn(5, 2, 4),)), "LSTM", 1)
