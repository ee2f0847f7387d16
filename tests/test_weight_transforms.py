"""Weights as users transform them, against nn's class put through the same transformation: pruning
(`torch.nn.utils.prune`), both weight norms (`torch.nn.utils.weight_norm`, `parametrizations.weight_norm`),
spectral norm (`parametrizations.spectral_norm`), a parametrization of our own (`torch.nn.utils.parametrize`,
with a parameter of its own), weight drop as in AWD-LSTM (a forward pre-hook setting a plain tensor,
dropout > 0 under a fixed seed) and a weight deleted before the module is moved; for RNN, LSTM (`proj_size`
too) and GRU, on the PyTorch path, CPU `auto` (ATen's kernel) and the kernels (interpreted): outputs, the
gradients of the underlying parameters and the transformations' buffers over two calls with the weights
changed in between (no stale value; also under torch.compile), `vmap`, `convert` / `to_torch`, ONNX export,
the errors for a weight that is not set and for a zero-length sequence."""

import warnings

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, assert_same_outcome, outcome
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import fused_birnn
from fused_birnn.functional import INTERPRETER

I, H, T, B = 4, 6, 3, 3
CELLS = {"RNN": (fused_birnn.RNN, nn.RNN, {}), "LSTM": (fused_birnn.LSTM, nn.LSTM, {}),
         "LSTM-proj": (fused_birnn.LSTM, nn.LSTM, {"proj_size": 3}), "GRU": (fused_birnn.GRU, nn.GRU, {})}
# CPU `auto` without the interpreter runs ATen's kernel (`aten_calls` switches the interpreter off)
PATHS = ["torch", "aten", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETER,
                                                                          reason="needs TRITON_INTERPRET=1"))]


def targets(cell: str) -> list[str]:
    """The weights transformed: a recurrent one of the first layer, an input one of the second layer's
    reverse direction and, with a projection, a projection."""
    return ["weight_hh_l0", "weight_ih_l1_reverse"] + (["weight_hr_l0_reverse"] if cell == "LSTM-proj" else [])


# ------------------------------------------------------------------------------------ the transformations

def pruned(m, names):
    for name in names:
        prune.l1_unstructured(m, name, amount=0.3)


def old_weight_norm(m, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for parametrizations.weight_norm
        for name in names:
            nn.utils.weight_norm(m, name)


def weight_norm(m, names):
    for name in names:
        parametrizations.weight_norm(m, name)


def spectral_norm(m, names):  # its power iteration advances with every evaluation in training mode
    for name in names:
        parametrizations.spectral_norm(m, name)


def old_spectral_norm(m, names):
    for name in names:
        nn.utils.spectral_norm(m, name)


class RowScale(nn.Module):
    """A parametrization with a parameter of its own: `tanh(W) * scale` per row."""

    def __init__(self, rows: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, rows)[:, None])

    def forward(self, w):
        return torch.tanh(w) * self.scale


def custom(m, names):
    for name in names:
        parametrize.register_parametrization(m, name, RowScale(getattr(m, name).shape[0]))


def _set_dropped(module, names, p):
    for name in names:
        setattr(module, name, nn.functional.dropout(getattr(module, name + "_raw"), p, module.training))


def weight_drop(m, names):
    """AWD-LSTM's weight drop (as torchnlp's `WeightDrop`): each weight replaced by a raw parameter, a
    forward pre-hook setting the dropped-out plain tensor before every call."""
    for name in names:
        m.register_parameter(name + "_raw", nn.Parameter(m._parameters.pop(name).detach().clone()))
    m.register_forward_pre_hook(lambda module, args: _set_dropped(module, names, 0.5))


def delete_then_move(m, names):
    """As fastai's `WeightDropout` re-creates a weight: `del` it, the module moved while it is missing, a
    pre-hook setting it from a raw parameter."""
    raw = {name: getattr(m, name).detach().clone() for name in names}
    for name in names:
        delattr(m, name)
    m.cpu().to(torch.float32)
    for name in names:
        m.register_parameter(name + "_raw", nn.Parameter(raw[name]))
    m.register_forward_pre_hook(lambda module, args: _set_dropped(module, names, 0.25))


TRANSFORMS = [pruned, old_weight_norm, weight_norm, spectral_norm, custom, weight_drop, delete_then_move]
# what convert / to_torch carry over (weight drop is a user's hook: refused)
CONVERTIBLE = [pruned, old_weight_norm, weight_norm, spectral_norm, old_spectral_norm, custom]


# ----------------------------------------------------------------------------------------------- helpers

def transformed_pair(cell, transforms, backend="torch", dtype=torch.float64):
    """Our module and nn's with the same weights, each put through `transforms` (`(fn, names)` pairs, the
    same random draws) in float32 and then moved (`.half()`, `.cpu()`, `.to(dtype)`) with them in place."""
    ours_cls, ref_cls, kwargs = CELLS[cell]
    torch.manual_seed(0)
    ref = ref_cls(I, H, 2, bidirectional=True, **kwargs)
    ours = ours_cls(I, H, 2, bidirectional=True, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    for m in (ours, ref):
        torch.manual_seed(1)
        for fn, names in transforms:
            fn(m, names)
        m.half().cpu().to(dtype)
    return ours, ref


def run(m, x, call=None, grads=True):
    """One call of `m` (or `call`, e.g. `m` compiled) under a fixed seed (weight drop's dropout): the outputs,
    the gradients of every parameter (the underlying ones: weight_orig, original0/1, weight_raw, ...; empty
    unless `grads`) and the buffers (masks, spectral norm's vectors), by name."""
    torch.manual_seed(2)
    out, hx = (m if call is None else call)(x)
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    outputs = [out, *(hx if isinstance(hx, tuple) else (hx,))]
    loss = sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).sum() for t in outputs)
    names, params = zip(*m.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params))) if grads else {}
    return outputs, grads, {n: b.clone() for n, b in m.named_buffers()}


def assert_same_run(ours, ref, x, what, grads=True):
    (outs, grads, buffers), (ref_outs, ref_grads, ref_buffers) = run(ours, x, grads=grads), run(ref, x, grads=grads)
    for i, (a, b) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close(a, b, torch.float64, f"{what}: output {i}")
    assert grads.keys() == ref_grads.keys() and buffers.keys() == ref_buffers.keys()
    for name, g in ref_grads.items():
        assert_close(grads[name], g, torch.float64, f"{what}: grad {name}")
    for name, b in ref_buffers.items():
        assert_close(buffers[name], b, torch.float64, f"{what}: buffer {name}")
    return outs


def change_weights(*modules):
    """The same in-place change of every parameter of each module (the underlying ones)."""
    with torch.no_grad():
        for params in zip(*(m.parameters() for m in modules), strict=True):
            delta = 0.2 * torch.randn_like(params[0])
            for p in params:
                p.add_(delta)


# ----------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_transformed_weights_run_as_in_nn(cell, transform, path, request):
    """Outputs, gradients of the underlying parameters and buffers equal nn's; the weights changed in place,
    the next call's outputs and buffers too: it runs the changed weights (no stale copy or slice)."""
    calls = request.getfixturevalue("aten_calls") if path == "aten" else None
    ours, ref = transformed_pair(cell, [(transform, targets(cell))], "auto" if path == "aten" else path)
    x = torch.randn(T, B, I, dtype=torch.float64)
    first = assert_same_run(ours, ref, x, "first call")[0]
    change_weights(ours, ref)
    second = assert_same_run(ours, ref, x, "weights changed", grads=False)[0]
    assert not torch.allclose(first, second)
    if calls is not None:
        assert calls, "CPU auto did not run ATen's kernel"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", ["RNN", "LSTM"])
def test_packed_and_lengths_with_transformed_weights(cell, path, request):
    """A PackedSequence and `lengths=` (ATen's packed kernel on CPU `auto`) read the transformed weights too."""
    calls = request.getfixturevalue("aten_calls") if path == "aten" else None
    ours, ref = transformed_pair(cell, [(weight_norm, ["weight_hh_l0"]), (pruned, ["weight_ih_l1"])],
                                 "auto" if path == "aten" else path)
    lengths = torch.tensor([T, 1, 2])
    x = torch.randn(T, B, I, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert_same_run(ours, ref, packed, "packed")
    out = ours(x, lengths=lengths)[0]
    expected = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], total_length=T)[0]
    assert_close(out, expected, torch.float64, "lengths=")
    if calls is not None:
        assert calls


# ------------------------------------------------------------------------------------- moving, flattening

def test_flat_buffers_leave_transformed_weights_alone_and_take_them_back():
    """flatten_parameters (on every move) keeps the kinds of a layer whose weights are all Parameters in
    its flat buffers and packs the rest per call; removing the transformations and moving makes the
    module flat again, with nn's numbers throughout. It evaluates no parametrization (spectral norm's
    vectors do not move)."""
    ours, ref = transformed_pair("LSTM", [(spectral_norm, ["weight_hh_l0"]), (pruned, ["weight_ih_l1_reverse"])])
    kinds = [[buf is not None for buf in layer] for layer in ours._layer_buffers]
    assert kinds == [[True, False, True, True], [False, True, True, True]], kinds
    u = ours.parametrizations.weight_hh_l0[0]._u.clone()
    ours.flatten_parameters()
    assert torch.equal(u, ours.parametrizations.weight_hh_l0[0]._u)
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert_same_run(ours, ref, x, "transformed")
    for m in (ours, ref):
        parametrize.remove_parametrizations(m, "weight_hh_l0")
        prune.remove(m, "weight_ih_l1_reverse")
    assert type(ours) is fused_birnn.LSTM
    assert_same_run(ours, ref, x, "removed")  # a replaced Parameter: packed per call until flattened
    ours.float().double()
    assert all(buf is not None for layer in ours._layer_buffers for buf in layer)
    assert ours.weight_hh_l0.data_ptr() == ours._layer_buffers[0][1][0].data_ptr()
    ref.float().double()
    assert_same_run(ours, ref, x, "flat again")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_a_weight_left_unset_raises_typeerror_naming_it(cell, path, request):
    """Deleted and moved with nothing setting it again: nn's forward raises a TypeError (ATen's); ours,
    before any kernel, a TypeError that names the weight. Deleted without a move, both run on."""
    if path == "aten":
        request.getfixturevalue("aten_calls")
    ours_cls, ref_cls, _ = CELLS[cell]
    ours = ours_cls(I, H, 2, bidirectional=True, backend="auto" if path == "aten" else path)
    ref = ref_cls(I, H, 2, bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I)
    for m in (ours, ref):
        del m.weight_hh_l1
    torch.testing.assert_close(ours(x)[0], ref(x)[0])  # nn runs on with the weight it last read
    for m in (ours, ref):
        m.cpu()
    assert_same_outcome(outcome(lambda: ours(x)), outcome(lambda: ref(x)), "weight_hh_l1 unset")
    with pytest.raises(TypeError, match="weight_hh_l1"):
        ours(x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_zero_length_sequence_raises_nns_message(cell, path, request):
    if path == "aten":
        request.getfixturevalue("aten_calls")
    ours_cls, ref_cls, _ = CELLS[cell]
    ours, ref = ours_cls(I, H, backend="auto" if path == "aten" else path), ref_cls(I, H)
    x = torch.randn(0, B, I)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with pytest.raises(RuntimeError) as raised:
        ours(x)
    assert str(raised.value) == str(expected.value) == "Expected sequence length to be larger than 0 in RNN"


# ---------------------------------------------------------------------------------- torch.compile, vmap

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", ["RNN", "LSTM-proj", "GRU"])
def test_changed_weights_are_seen_under_torch_compile(cell, backend):
    """Compiled whole (fullgraph): the parametrization and the pruning hook are traced, and the compiled
    module follows the weights changed in place and a Parameter replaced between calls, with nn's eager
    outputs and gradients."""
    ours, ref = transformed_pair(cell, [(weight_norm, ["weight_hh_l0"]), (pruned, ["weight_ih_l1_reverse"])],
                                 backend)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    first = compiled(x)[0]
    assert_close(first, ref(x)[0], torch.float64, "first call")
    change_weights(ours, ref)
    for m in (ours, ref):
        m.weight_hh_l1 = nn.Parameter(torch.linspace(-0.5, 0.5, m.weight_hh_l1.numel(),
                                                     dtype=torch.float64).view_as(m.weight_hh_l1))
    (outs, grads, _), (ref_outs, ref_grads, _) = run(ours, x, compiled), run(ref, x)
    for a, b in zip(outs, ref_outs, strict=True):
        assert_close(a, b, torch.float64, "weights changed")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, torch.float64, f"grad {name}")
    assert not torch.allclose(outs[0], first)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_vmap_over_inputs_of_a_transformed_module(cell, backend):
    ours, ref = transformed_pair(cell, [(weight_norm, ["weight_hh_l0"]), (pruned, ["weight_ih_l1_reverse"])],
                                 backend)
    xs = torch.randn(2, T, B, I, dtype=torch.float64)
    out = torch.func.vmap(lambda x: ours(x)[0])(xs)
    assert_close(out, torch.stack([ref(x)[0] for x in xs]), torch.float64, "vmap")


# ------------------------------------------------------------------------------- convert, to_torch, ONNX

@pytest.mark.parametrize("transform", CONVERTIBLE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_convert_and_to_torch_carry_the_transformation_over(cell, transform):
    """The converted module runs the transformation as the original did (same Parameter objects and
    buffers, spectral norm's power iteration stepping alike), and so does the module `to_torch` makes."""
    model, ref = (nn.Sequential(m) for m in transformed_pair(cell, [(transform, targets(cell))])[::-1])
    ref[0].load_state_dict(model[0].state_dict())  # both nn's (the pair's first is ours)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert fused_birnn.convert(model, backend="torch", report=True) == (model, [])
    assert isinstance(model[0], fused_birnn.LSTM if cell.startswith("LSTM") else getattr(fused_birnn, cell))
    assert dict(model.named_parameters()) == params and dict(model.named_buffers()) == buffers
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert_same_run(model, ref, x, "converted")
    assert fused_birnn.to_torch(model, report=True) == (model, [])
    assert isinstance(model[0], CELLS[cell][1]) and not isinstance(model[0], fused_birnn.rnn.FusedRNNBase)
    assert dict(model.named_parameters()) == params
    assert_same_run(model, ref, x, "back to torch")


def test_convert_refuses_a_weight_drop_hook_saying_what_to_do():
    model = nn.Sequential(nn.LSTM(I, H))
    weight_drop(model[0], ["weight_hh_l0"])
    with pytest.warns(UserWarning, match=r"'0': has module hooks registered on it \(function in "
                                         r"_forward_pre_hooks\), .*convert first, then register them"):
        fused_birnn.convert(model)
    assert type(model[0]) is nn.LSTM


# pruning's hook sets the weight on the module while torch.export traces it (nn's class alike): export says so
@pytest.mark.filterwarnings("ignore:The tensor attributes .* were assigned during export")
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_onnx_export_runs_the_transformed_weights(cell):
    """The exported graph computes the weights as the module does (here folded into constants): onnxruntime
    gives nn's outputs for a pruned and weight-normed module."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ours, ref = transformed_pair(cell, [(weight_norm, ["weight_hh_l0"]), (pruned, ["weight_ih_l1_reverse"])],
                                 dtype=torch.float32)
    ours.eval(), ref.eval()
    x = torch.randn(T, B, I)
    program = fused_birnn.export.to_onnx(ours, (x,), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref(x)[0], atol=1e-5, rtol=1e-5)
