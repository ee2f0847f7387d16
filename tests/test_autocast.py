"""Autocast: under `torch.autocast` fused_birnn.RNN behaves as nn.RNN does on the CPU (measured with
torch 2.13): the output and h_n come out in autocast's dtype, the fp32 weights, input and hx are cast
(their gradients stay fp32), float64 is left alone. The interpreter cannot do bf16 arithmetic
(NOTES-triton.md 3), so under CPU bf16 autocast backend='auto' takes the PyTorch path."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close

import fused_birnn
from fused_birnn import functional
from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels import backward as kernel_backward
from fused_birnn.kernels import forward as kernel_forward

CFG = dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=True)
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def outputs_and_grads(model, x, h0, device_type, dtype=None):
    """Outputs and gradients of one step, under autocast to `dtype` (None: no autocast)."""
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    model.zero_grad()
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        out, h_n = model(x, h0)
    (out.double().sum() + (h_n.double() ** 2).sum()).backward()
    return [out, h_n, x.grad, h0.grad] + [p.grad for p in model.parameters()]


def check_against_nn_rnn(device, dtype, backend, **kw):
    """Ours and nn.RNN under the same autocast: the same dtypes, and against a float64 run of the
    same weights an error no worse than twice nn.RNN's own (plus a small floor)."""
    ours = fused_birnn.RNN(**CFG, **kw, device=device, backend=backend)
    ref = torch.nn.RNN(**CFG, **kw, device=device)
    ref64 = torch.nn.RNN(**CFG, **kw, device=device, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    ref64.load_state_dict(ours.state_dict())
    x, h0 = torch.randn(5, 4, 3, device=device), torch.randn(4, 4, 6, device=device)
    got = outputs_and_grads(ours, x, h0, device, dtype)
    theirs = outputs_and_grads(ref, x, h0, device, dtype)
    exact = outputs_and_grads(ref64, x.double(), h0.double(), device)
    assert [t.dtype for t in got] == [dtype, dtype] + [torch.float32] * (len(got) - 2)
    if device == "cpu":  # on CUDA nn.RNN's cuDNN path runs fp16 whatever autocast's dtype (test_cuda_autocast)
        assert [t.dtype for t in got] == [t.dtype for t in theirs]
    for i, (a, b, e) in enumerate(zip(got, theirs, exact, strict=True)):
        scale = e.abs().max().item() + 1e-30
        err_ours, err_theirs = [(t.double() - e).abs().max().item() / scale for t in (a, b)]
        assert err_ours <= 2 * err_theirs + FLOOR[dtype], f"tensor {i}: ours {err_ours:.2e}, nn.RNN {err_theirs:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_autocast_matches_nn_rnn(dtype, backend):
    if dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("the interpreter cannot run bf16: test_triton_backend_refuses_bf16_autocast")
    check_against_nn_rnn("cpu", dtype, backend, nonlinearity="relu" if dtype == torch.float16 else "tanh")


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, launches", [(torch.bfloat16, 0), (torch.float16, 4)], ids=["bf16", "fp16"])
def test_auto_backend_under_cpu_autocast(dtype, launches, monkeypatch):
    """'auto' picks by the dtype the layers run in: bf16 (not interpretable) -> the PyTorch path,
    bit for bit; fp16 -> the kernels (2 layers: 2 forward + 2 backward launches)."""
    counted = []

    def counting(launch):
        def launch_and_count(*args, **kwargs):
            counted.append(launch.__name__)
            return launch(*args, **kwargs)
        return launch_and_count

    for module, name in ((kernel_forward, "recurrence_forward"), (kernel_backward, "recurrence_backward")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    auto = fused_birnn.RNN(**CFG, backend="auto")
    torch_path = fused_birnn.RNN(**CFG, backend="torch")
    torch_path.load_state_dict(auto.state_dict())
    x, h0 = torch.randn(5, 4, 3), torch.randn(4, 4, 6)
    got = outputs_and_grads(auto, x, h0, "cpu", dtype)
    assert len(counted) == launches
    if dtype == torch.bfloat16:
        assert all(torch.equal(a, b) for a, b in zip(got, outputs_and_grads(torch_path, x, h0, "cpu", dtype)))


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
def test_triton_backend_refuses_bf16_autocast():
    m = fused_birnn.RNN(**CFG, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="backend='triton' supports"):
        m(torch.randn(5, 4, 3))


def test_float64_and_disabled_autocast_are_left_alone():
    m = fused_birnn.RNN(**CFG, dtype=torch.float64)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.float64 for t in m(x))
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert all(t.dtype == torch.float32 for t in m(x.float()))


def test_packed_sequence_and_lengths_under_autocast():
    m = fused_birnn.RNN(**CFG)
    x = torch.randn(5, 3, 3)
    lengths = torch.tensor([5, 2, 4])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = m(x, None, lengths)
        packed_out, packed_h_n = m(packed)
    assert out.dtype == h_n.dtype == packed_out.data.dtype == packed_h_n.dtype == torch.bfloat16
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
    assert torch.equal(padded, out) and torch.equal(packed_h_n, h_n)


def test_autocast_under_compile():
    """Autocast entered inside a fullgraph-compiled step: the same dtypes and numbers as eager."""
    torch._dynamo.reset()
    m = fused_birnn.RNN(**CFG)
    x, h0 = torch.randn(5, 4, 3), torch.randn(4, 4, 6)

    def step(x, h0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, h_n = m(x, h0)
        return out, h_n, out.double().sum() + (h_n.double() ** 2).sum()

    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        m.zero_grad()
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n, loss = fn(xx, hh)
        loss.backward()
        results.append([out, h_n, xx.grad, hh.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b, torch.bfloat16, "compiled vs eager")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast(dtype):
    """On CUDA the layers run on the kernels in autocast's dtype. nn.RNN's cuDNN path casts to fp16
    whatever autocast's dtype (aten/src/ATen/cudnn/AutocastRNN.cpp): with bf16 only the errors compare."""
    check_against_nn_rnn("cuda", dtype, "triton")
