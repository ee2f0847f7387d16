"""On a GPU: the compiled kernels against cuDNN (nn.RNN on CUDA) at realistic sizes, fp32/fp16/bf16,
forward and backward; T >= 65,536 (where cuDNN fails) with int64 offsets; determinism; eval backward.

Run with `TRITON_INTERPRET=0 pytest -m cuda tests` (bench/gpu_run.sh does). Accuracy criterion: against
cuDNN in float64, our error is no worse than cuDNN's own error in the same dtype (plus a small floor)."""

import pytest
import torch

import fused_birnn

pytestmark = pytest.mark.cuda

# (input_size, hidden_size, num_layers, T, B): on-chip W_hh (H <= 128 fp32, <= 256 fp16) and streamed
SIZES = [(64, 128, 2, 256, 64), (128, 256, 2, 256, 64), (256, 512, 2, 256, 64), (25, 50, 4, 5, 15)]
FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def grads_of(model, x, h0, g_out, g_hn):
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    out, hn = model(x, h0)
    loss = (out.double() * g_out).sum() + (hn.double() * g_hn).sum()
    return [out, hn, *torch.autograd.grad(loss, [x, h0, *model.parameters()])]


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "I{}-H{}-L{}-T{}-B{}".format(*s))
def test_parity_against_cudnn(size, dtype, no_tf32):
    I, H, L, T, B = size
    ref64 = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=torch.float64)
    cudnn = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype)
    ours = fused_birnn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype, backend="triton")
    cudnn.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    h0 = torch.randn(2 * L, B, H, device="cuda", dtype=torch.float64)
    g_out = torch.randn(T, B, 2 * H, device="cuda", dtype=torch.float64)
    g_hn = torch.randn(2 * L, B, H, device="cuda", dtype=torch.float64)
    expected = grads_of(ref64, x, h0, g_out, g_hn)
    try:
        theirs = grads_of(cudnn, x.to(dtype), h0.to(dtype), g_out, g_hn)
    except RuntimeError as e:  # bf16 needs a recent cuDNN
        pytest.skip(f"cuDNN cannot run {dtype}: {e}")
    mine = grads_of(ours, x.to(dtype), h0.to(dtype), g_out, g_hn)
    names = ["output", "h_n", "grad input", "grad h0"] + [n for n, _ in ours.named_parameters()]
    for name, e, t, m in zip(names, expected, theirs, mine, strict=True):
        scale = e.abs().max().item() + 1e-30
        err_ours = (m.double() - e).abs().max().item() / scale
        err_cudnn = (t.double() - e).abs().max().item() / scale
        assert err_ours <= 2 * err_cudnn + FLOOR[dtype], f"{name}: ours {err_ours:.2e}, cuDNN {err_cudnn:.2e}"


def test_fp32_follows_cudnn_tf32_switch():
    m = fused_birnn.RNN(64, 128, 1, bidirectional=True, device="cuda", backend="triton")
    ref = fused_birnn.RNN(64, 128, 1, bidirectional=True, device="cuda", dtype=torch.float64, backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(64, 32, 64, device="cuda")
    expected = ref(x.double())[0]
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        err_ieee = (m(x)[0].double() - expected).abs().max().item()
        torch.backends.cudnn.allow_tf32 = True
        err_tf32 = (m(x)[0].double() - expected).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert err_ieee < 1e-4 and err_tf32 > err_ieee


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_long_sequence_past_cudnn_limit(dtype, no_tf32):
    """T = 100,000 >= 65,536 (cuDNN fails there); with B=44, 2H=512 the [T, B, 2H] buffers hold 2.25e9
    elements, past 2**31, so only int64 offsets give the right answer. Checked against the PyTorch
    path on the same GPU (fp32 accumulation in both)."""
    T, B, H = 100_000, 44, 256
    m = fused_birnn.RNN(8, H, 1, bidirectional=True, device="cuda", dtype=dtype, backend="triton")
    ref = fused_birnn.RNN(8, H, 1, bidirectional=True, device="cuda", dtype=torch.float32, backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, B, 8, device="cuda", dtype=dtype, requires_grad=True)
    out, hn = m(x)
    assert out.numel() > 2 ** 31
    with torch.no_grad():
        r_out, r_hn = ref(x.float())
    tol = 5e-2 if dtype == torch.float16 else 1e-3
    for t in (0, 1, 65_535, 65_536, 97_000, T - 1):
        torch.testing.assert_close(out[t].float(), r_out[t], atol=tol, rtol=tol)
    torch.testing.assert_close(hn.float(), r_hn, atol=tol, rtol=tol)
    del r_out
    out[-1].float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_deterministic_and_eval_backward_on_gpu():
    m = fused_birnn.RNN(64, 256, 2, bidirectional=True, device="cuda", dtype=torch.float16).eval()
    x = torch.randn(128, 32, 64, device="cuda", dtype=torch.float16)

    def once():
        xx = x.clone().requires_grad_()
        m.zero_grad()
        out, hn = m(xx)
        (out.float().square().sum() + hn.float().sum()).backward()
        return [out, hn, xx.grad] + [p.grad.clone() for p in m.parameters()]

    a, b = once(), once()
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_one_layer_streamed_large_hidden():
    """H = 1760 (DeepBench), streamed W_hh, fp16: forward and backward finite and close to fp32 PyTorch."""
    m = fused_birnn.RNN(1760, 1760, 1, bidirectional=True, device="cuda", dtype=torch.float16)
    ref = fused_birnn.RNN(1760, 1760, 1, bidirectional=True, device="cuda", backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(50, 32, 1760, device="cuda", dtype=torch.float16)
    out, _ = m(x)
    with torch.no_grad():
        r_out, _ = ref(x.float())
    torch.testing.assert_close(out.float(), r_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_parity_against_cudnn(dtype, no_tf32):
    """PackedSequence (speech-like lengths between T/2 and T, unsorted) against cuDNN's packed path,
    both judged against float64 cuDNN."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    I, H, L, T, B = 64, 256, 2, 200, 32
    ref64 = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=torch.float64)
    cudnn = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype)
    ours = fused_birnn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype, backend="triton")
    cudnn.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    lengths = torch.randint(T // 2, T + 1, (B,))
    lengths[0] = T
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    g_out = torch.randn(T, B, 2 * H, device="cuda", dtype=torch.float64)

    def run(model, dt):
        xx = x.to(dt).requires_grad_()
        out, hn = model(pack_padded_sequence(xx, lengths, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out, total_length=T)
        loss = (padded.double() * g_out).sum() + hn.double().sum()
        return [padded, hn, *torch.autograd.grad(loss, [xx, *model.parameters()])]

    expected, theirs, mine = run(ref64, torch.float64), run(cudnn, dtype), run(ours, dtype)
    for e, t, m in zip(expected, theirs, mine, strict=True):
        scale = e.abs().max().item() + 1e-30
        err_ours = (m.double() - e).abs().max().item() / scale
        err_cudnn = (t.double() - e).abs().max().item() / scale
        assert err_ours <= 2 * err_cudnn + FLOOR[dtype], f"ours {err_ours:.2e}, cuDNN {err_cudnn:.2e}"


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "device-lengths"])
def test_cuda_graph_captures_a_training_step(with_lengths, no_tf32):
    """Forward, backward and an SGD step of a 2-layer bidirectional RNN captured in one CUDA graph
    (capture fails on any host-device sync) and replayed on new data: the same losses and weights as
    the same steps run eagerly. Device lengths are a static input; their value check is skipped
    while capturing (the warm-up, eager, checked them)."""
    import copy

    model = fused_birnn.RNN(16, 32, 2, bidirectional=True, device="cuda", backend="triton")
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    x, h0 = torch.randn(9, 6, 16, device="cuda"), torch.randn(4, 6, 32, device="cuda")
    lengths = torch.tensor([9, 3, 7, 1, 9, 5], device="cuda") if with_lengths else None
    data = [(torch.randn_like(x), torch.randn_like(h0)) for _ in range(3)]

    def step(m, o, x, h0):
        o.zero_grad(set_to_none=True)
        out, h_n = m(x, h0, lengths)
        loss = out.square().mean() + h_n.mean()
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: kernels compiled, optimizer state made
        for _ in range(2):
            step(model, opt, x, h0)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(twin, twin_opt, x, h0)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, x, h0)  # recorded, not run
    for new_x, new_h0 in data:
        x.copy_(new_x)
        h0.copy_(new_h0)
        graph.replay()
        twin_loss = step(twin, twin_opt, new_x, new_h0)
        torch.testing.assert_close(static_loss, twin_loss)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q)
