"""The nn.Module conveniences a drop-in must honour, beyond tests/test_module.py: flatten_parameters(),
repr, dtype casts (.to(float64), .half(), .bfloat16()) with numbers checked, serialisation keeping the
configuration, independent copies, state_dict through disk into nn.RNN, share_memory, functional_call."""

import copy
import io
import pickle

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close
from torch import nn
from torch.func import functional_call

import fused_birnn

CFG = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)


def pair(dtype=torch.float64, backend="auto", **kw):
    """A fused_birnn.RNN and an nn.RNN with the same weights."""
    ours = fused_birnn.RNN(**CFG, **kw, dtype=dtype, backend=backend)
    ref = nn.RNN(**CFG, **kw, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def is_flat(m):
    """Every parameter is the slot of its layer's flat buffer (no per-call packing)."""
    return all(all(buf is not None and p.data_ptr() == buf[d].data_ptr()
                   for d, ps in enumerate(m._layer_params(layer)) for buf, p in zip(bufs, ps, strict=True))
               for layer, bufs in enumerate(m._layer_buffers))


def outputs_and_grads(m, x, h0):
    m.zero_grad()
    x = x.clone().requires_grad_()
    out, h_n = m(x, h0)
    ((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + h_n.sum()).backward()
    return [out, h_n, x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flatten_parameters_is_idempotent_and_adopts_replaced_parameters(backend):
    m, ref = pair(backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    before = m(x)
    buffers = [b.data_ptr() for layer in m._layer_buffers for b in layer]
    m.flatten_parameters()
    m.flatten_parameters()
    assert [b.data_ptr() for layer in m._layer_buffers for b in layer] == buffers  # nothing re-packed
    assert all(torch.equal(a, b) for a, b in zip(m(x), before))
    new = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    m.weight_hh_l1_reverse = ref.weight_hh_l1_reverse = new
    assert not is_flat(m)  # packed per call until flattened again
    m.flatten_parameters()
    assert m.weight_hh_l1_reverse is new and is_flat(m)
    for a, b in zip(m(x), ref(x)):
        assert_close(a, b, torch.float64, "after flatten_parameters")


def test_repr():
    assert repr(fused_birnn.RNN(3, 4)) == repr(nn.RNN(3, 4)) == "RNN(3, 4)"
    m = fused_birnn.RNN(3, 4, 2, nonlinearity="relu", bias=False, batch_first=True, dropout=0.5,
                        bidirectional=True, backend="torch")
    assert repr(m) == ("RNN(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True, "
                       "nonlinearity='relu', backend='torch')")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_to_float64(backend):
    m, ref = pair(torch.float32, backend)
    names = [n for n, _ in m.named_parameters()]
    assert m.to(torch.float64) is m
    ref.to(torch.float64)
    assert [n for n, _ in m.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float64 for p in m.parameters()) and is_flat(m)
    x, h0 = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(4, 2, 4, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(outputs_and_grads(m, x, h0), outputs_and_grads(ref, x, h0))):
        assert_close(a, b, torch.float64, f"tensor {i}")


@pytest.mark.parametrize("dtype, backend", [
    (torch.float16, "torch"),
    pytest.param(torch.float16, "triton", marks=CPU_BACKENDS[0].marks),  # fp16 runs in the interpreter
    (torch.bfloat16, "torch"),  # bf16 does not (functional.TRITON_INTERPRETER_DTYPES)
])
def test_half_and_bfloat16(dtype, backend):
    m = fused_birnn.RNN(**CFG, backend=backend)
    cast = m.half() if dtype == torch.float16 else m.bfloat16()
    assert cast is m and all(p.dtype == dtype for p in m.parameters()) and is_flat(m)
    ref = nn.RNN(**CFG, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())  # the rounded weights, upcast
    x, h0 = torch.randn(5, 2, 3, dtype=dtype), torch.randn(4, 2, 4, dtype=dtype)
    got = outputs_and_grads(m, x, h0)
    want = outputs_and_grads(ref, x.double(), h0.double())
    assert all(t.dtype == dtype for t in got)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, dtype, f"tensor {i}")


def test_whole_module_copies_keep_configuration_and_are_independent():
    m = fused_birnn.RNN(3, 4, 2, nonlinearity="relu", batch_first=True, bidirectional=True,
                        dtype=torch.float64, backend="torch").eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    clones = [copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False)]
    for clone in clones:
        assert (clone.backend, clone.nonlinearity, clone.batch_first, clone.training) == ("torch", "relu", True, False)
        assert all(torch.equal(a, b) for a, b in zip(clone(x), expected))
        assert is_flat(clone)
        with torch.no_grad():
            clone.weight_hh_l0.mul_(2)  # the copy has buffers of its own
        clone(x)[0].sum().backward()
        assert clone.weight_hh_l0.grad is not None and m.weight_hh_l0.grad is None
    assert all(torch.equal(a, b) for a, b in zip(m(x), expected))
    assert not torch.equal(clones[0](x)[0], expected[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_state_dict_through_disk_into_nn_rnn_and_back(dtype):
    m = fused_birnn.RNN(**CFG, dtype=dtype, backend="torch")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    ref = nn.RNN(**CFG, dtype=dtype)
    ref.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 2, 3, dtype=dtype)
    for a, b in zip(m(x), ref(x)):
        assert_close(a, b, dtype, "state_dict into nn.RNN")
    # and nn.RNN's weights into an existing module: copied into the flat buffers in place
    ptrs = [p.data_ptr() for p in m.parameters()]
    other = nn.RNN(**CFG, dtype=dtype)
    m.load_state_dict(other.state_dict())
    assert [p.data_ptr() for p in m.parameters()] == ptrs and is_flat(m)
    for a, b in zip(m(x), other(x)):
        assert_close(a, b, dtype, "nn.RNN state_dict into fused_birnn.RNN")


def test_share_memory_keeps_buffers_flat():
    m, ref = pair(backend="torch")
    assert m.share_memory() is m
    assert all(p.is_shared() for p in m.parameters()) and is_flat(m)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(m(x), ref(x)):
        assert_close(a, b, torch.float64, "after share_memory")


def test_functional_call_uses_the_given_tensors():
    m, ref = pair(backend="torch")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = m(x)
    params = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    for a, b in zip(functional_call(m, params, (x,)), functional_call(ref, params, (x,))):
        assert_close(a, b, torch.float64, "functional_call")
    assert is_flat(m) and all(torch.equal(a, b) for a, b in zip(m(x), expected))  # module untouched
