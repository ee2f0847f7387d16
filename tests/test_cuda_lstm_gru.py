"""On a GPU: fused_birnn.LSTM (with and without proj_size) and GRU on the compiled kernels against cuDNN
(nn.LSTM / nn.GRU on CUDA) at the surveyed workloads' hidden sizes, fp32/fp16/bf16, forward and backward;
packed sequences; T >= 65,536 (cuDNN refuses it); determinism and eval-mode backward; a training step
captured in a CUDA graph; torch.compile(fullgraph=True); the split plan forced to S = 2.

Run with `TRITON_INTERPRET=0 pytest -m cuda tests` (bench/gpu_run.sh does). Accuracy criterion as in
tests/test_cuda.py: against a float64 run of the same weights, our error is no worse than twice cuDNN's
own error in the same dtype plus a small floor."""

import copy

import pytest
import torch
from conftest import assert_no_worse_than_cudnn
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_birnn

pytestmark = pytest.mark.cuda

CLASSES = {"LSTM": (fused_birnn.LSTM, nn.LSTM), "GRU": (fused_birnn.GRU, nn.GRU)}
# (cell, I, H, L, proj, T, B): pyannote-like, Open-Unmix-like, ESPnet-like, deepspeech-like, NeMo-like
# (short T), an odd size
SIZES = [
    ("LSTM", 60, 128, 2, 0, 128, 32),
    ("LSTM", 512, 256, 2, 0, 64, 16),
    ("LSTM", 80, 320, 1, 0, 64, 16),
    ("LSTM", 161, 1024, 1, 0, 32, 32),
    ("LSTM", 320, 2048, 1, 320, 16, 16),
    ("GRU", 161, 1024, 1, 0, 32, 32),
    ("GRU", 25, 50, 3, 0, 5, 15),
    ("LSTM", 25, 50, 2, 7, 5, 15),
]


def make(cell, I, H, L, proj, dtype, **kw):
    """float64 reference, cuDNN in `dtype`, ours in `dtype`: the same weights."""
    extra = {"proj_size": proj} if proj else {}
    ours_cls, ref_cls = CLASSES[cell]
    ref64 = ref_cls(I, H, L, bidirectional=True, device="cuda", dtype=torch.float64, **extra)
    cudnn = ref_cls(I, H, L, bidirectional=True, device="cuda", dtype=dtype, **extra)
    ours = ours_cls(I, H, L, bidirectional=True, device="cuda", dtype=dtype, backend="triton", **kw, **extra)
    cudnn.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    return ref64, cudnn, ours


def run(model, x, hx, upstream, dtype=None):
    """Outputs and every gradient of `sum(output_i * upstream_i)`."""
    dtype = dtype or next(model.parameters()).dtype
    x = x.to(dtype).requires_grad_()
    hx = tuple(h.to(dtype).requires_grad_() for h in hx)
    out, state = model(x, hx if len(hx) == 2 else hx[0])
    outputs = [out, *(state if isinstance(state, tuple) else (state,))]
    loss = sum((o.double() * u).sum() for o, u in zip(outputs, upstream))
    return outputs + list(torch.autograd.grad(loss, [x, *hx, *model.parameters()]))


def inputs(cell, I, H, L, proj, T, B):
    P = proj or H
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    hx = [torch.randn(2 * L, B, P, device="cuda", dtype=torch.float64)]
    if cell == "LSTM":
        hx.append(torch.randn(2 * L, B, H, device="cuda", dtype=torch.float64))
    upstream = [torch.randn(T, B, 2 * P, device="cuda", dtype=torch.float64)] + [torch.randn_like(h) for h in hx]
    return x, hx, upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "{}-I{}-H{}-L{}-P{}-T{}-B{}".format(*s))
def test_parity_against_cudnn(size, dtype, no_tf32):
    cell, I, H, L, proj, T, B = size
    ref64, cudnn, ours = make(cell, I, H, L, proj, dtype)
    x, hx, upstream = inputs(*size)
    expected = run(ref64, x, hx, upstream)
    try:
        theirs = run(cudnn, x, hx, upstream)
    except RuntimeError as e:  # bf16 needs a recent cuDNN
        pytest.skip(f"cuDNN cannot run {dtype}: {e}")
    mine = run(ours, x, hx, upstream)
    names = ["output", "h_n", *(["c_n"] if cell == "LSTM" else []), "grad input", "grad h0",
             *(["grad c0"] if cell == "LSTM" else []), *(n for n, _ in ours.named_parameters())]
    assert_no_worse_than_cudnn(expected, theirs, mine, dtype, names)


@pytest.mark.parametrize("split", ["2"], ids=["S2"])
@pytest.mark.parametrize("cell, proj", [("LSTM", 0), ("LSTM", 64), ("GRU", 0)], ids=["lstm", "lstm-proj", "gru"])
def test_split_against_cudnn(cell, proj, split, no_tf32, monkeypatch):
    """The split recurrence forced to S = 2 (the projection's second exchange included)."""
    from fused_birnn.kernels import launch

    monkeypatch.setenv(launch.SPLIT_ENV, split)
    size = (cell, 64, 256, 1, proj, 40, 8)
    ref64, cudnn, ours = make(cell, 64, 256, 1, proj, torch.float32)
    x, hx, upstream = inputs(*size)
    expected, theirs, mine = (run(m, x, hx, upstream) for m in (ref64, cudnn, ours))
    assert_no_worse_than_cudnn(expected, theirs, mine, torch.float32)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_packed_parity_against_cudnn(cell, no_tf32):
    ref64, cudnn, ours = make(cell, 32, 128, 2, 16 if cell == "LSTM" else 0, torch.float32)
    lengths = torch.tensor([50, 13, 1, 37, 50, 22])
    x = torch.randn(50, 6, 32, device="cuda", dtype=torch.float64)
    outs = []
    for model, dtype in ((ref64, torch.float64), (cudnn, torch.float32), (ours, torch.float32)):
        xs = x.to(dtype).requires_grad_()
        out, state = model(pack_padded_sequence(xs, lengths, enforce_sorted=False))
        states = state if isinstance(state, tuple) else (state,)
        loss = out.data.double().square().sum() + sum(s.double().sum() for s in states)
        outs.append([out.data, *states, *torch.autograd.grad(loss, [xs, *model.parameters()])])
    assert_no_worse_than_cudnn(*outs, torch.float32)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_long_sequence_past_cudnn_limit(cell, no_tf32):
    """T = 70,000: cuDNN refuses T >= 65,536; ours runs forward and backward and matches the PyTorch path."""
    m = CLASSES[cell][0](8, 64, 1, bidirectional=True, device="cuda", backend="triton")
    ref = CLASSES[cell][0](8, 64, 1, bidirectional=True, device="cuda", backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70_000, 2, 8, device="cuda")
    results = []
    for model in (m, ref):
        xs = x.clone().requires_grad_()
        out, _ = model(xs)
        results.append([out, *torch.autograd.grad(out.square().mean(), [xs, *model.parameters()])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_deterministic_and_eval_backward_on_gpu(cell):
    m = CLASSES[cell][0](64, 256, 2, bidirectional=True, device="cuda", dtype=torch.float16).eval()
    x = torch.randn(100, 16, 64, device="cuda", dtype=torch.float16)
    runs = []
    for _ in range(2):
        xs = x.clone().requires_grad_()
        out, _ = m(xs)
        runs.append([out, *torch.autograd.grad(out.float().square().sum(), [xs, *m.parameters()])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cuda_graph_captures_a_training_step(cell, no_tf32):
    model = CLASSES[cell][0](16, 32, 2, bidirectional=True, device="cuda", backend="triton")
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    x = torch.randn(9, 6, 16, device="cuda")
    lengths = torch.tensor([9, 3, 7, 1, 9, 5], device="cuda")
    data = [torch.randn_like(x) for _ in range(3)]

    def step(m, o, x):
        o.zero_grad(set_to_none=True)
        out, _ = m(x, lengths=lengths)
        loss = out.square().mean()
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, opt, x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(twin, twin_opt, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, x)
    for new_x in data:
        x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_loss, step(twin, twin_opt, new_x))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_compile_fullgraph_on_gpu(cell, no_tf32):
    m = CLASSES[cell][0](32, 64, 2, bidirectional=True, device="cuda", backend="triton")
    x = torch.randn(20, 4, 32, device="cuda", requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out, _ = compiled(x)
    ref, _ = m(x)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    g2 = torch.autograd.grad(ref.sum(), [x, *m.parameters()])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
