"""On a GPU: the compiled kernels against cuDNN (nn.RNN on CUDA) at realistic sizes, fp32/fp16/bf16,
forward and backward; T >= 65,536 (where cuDNN fails) with int64 offsets; determinism; eval backward;
the split recurrence (S cooperating programs per group: against cuDNN at H = 256, 512, 1760, 1,000
back-to-back launches, beside a busy stream, a grid too large for one wave ending in the error, CUDA
graphs) and the device guard.

Run with `TRITON_INTERPRET=0 pytest -m cuda tests` (bench/gpu_run.sh does). Accuracy criterion: against
cuDNN in float64, our error is no worse than cuDNN's own error in the same dtype (plus a small floor)."""

import pytest
import torch
from conftest import assert_no_worse_than_cudnn

import fused_birnn

pytestmark = pytest.mark.cuda

# (input_size, hidden_size, num_layers, T, B): on-chip W_hh (H <= 128 fp32, <= 256 fp16) and streamed
SIZES = [(64, 128, 2, 256, 64), (128, 256, 2, 256, 64), (256, 512, 2, 256, 64), (25, 50, 4, 5, 15)]


def against_cudnn(I, H, L, dtype):
    """A bidirectional float64 nn.RNN, cuDNN's nn.RNN in `dtype` and ours (the kernels) in `dtype`, all
    holding the same weights."""
    ref64 = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=torch.float64)
    cudnn = torch.nn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype)
    ours = fused_birnn.RNN(I, H, L, bidirectional=True, device="cuda", dtype=dtype, backend="triton")
    cudnn.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    return ref64, cudnn, ours


def grads_of(model, x, h0, g_out, g_hn):
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    out, hn = model(x, h0)
    loss = (out.double() * g_out).sum() + (hn.double() * g_hn).sum()
    return [out, hn, *torch.autograd.grad(loss, [x, h0, *model.parameters()])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "I{}-H{}-L{}-T{}-B{}".format(*s))
def test_parity_against_cudnn(size, dtype, no_tf32):
    I, H, L, T, B = size
    ref64, cudnn, ours = against_cudnn(I, H, L, dtype)
    x, h0, g_out, g_hn = (torch.randn(*shape, device="cuda", dtype=torch.float64)
                          for shape in ((T, B, I), (2 * L, B, H), (T, B, 2 * H), (2 * L, B, H)))
    expected = grads_of(ref64, x, h0, g_out, g_hn)
    try:
        theirs = grads_of(cudnn, x.to(dtype), h0.to(dtype), g_out, g_hn)
    except RuntimeError as e:  # bf16 needs a recent cuDNN
        pytest.skip(f"cuDNN cannot run {dtype}: {e}")
    mine = grads_of(ours, x.to(dtype), h0.to(dtype), g_out, g_hn)
    names = ["output", "h_n", "grad input", "grad h0"] + [n for n, _ in ours.named_parameters()]
    assert_no_worse_than_cudnn(expected, theirs, mine, dtype, names)


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
    ref64, cudnn, ours = against_cudnn(I, H, L, dtype)
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
    assert_no_worse_than_cudnn(expected, theirs, mine, dtype)


@pytest.mark.parametrize("split", [None, "2"], ids=["planned", "split2"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "device-lengths"])
def test_cuda_graph_captures_a_training_step(with_lengths, split, no_tf32, monkeypatch):
    """Forward, backward and an SGD step of a 2-layer bidirectional RNN captured in one CUDA graph
    (capture fails on any host-device sync) and replayed on new data: the same losses and weights as
    the same steps run eagerly. Device lengths are a static input; their value check is skipped
    while capturing (the warm-up, eager, checked them). With S = 2 the barrier counters are zeroed on
    the device inside the graph and the error flag's host copy is skipped while capturing."""
    import copy

    from fused_birnn.kernels import launch

    if split is None:
        monkeypatch.delenv(launch.SPLIT_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.SPLIT_ENV, split)

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


# ------------------------------------------------------------------------------------------------------
# the split recurrence: S cooperating programs per group, in-kernel barrier
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [None, 2, 3], ids=["planned", "S2", "S3"])
@pytest.mark.parametrize("H,B,dtype", [(256, 32, torch.float32), (512, 8, torch.float16),
                                       (1760, 32, torch.float16)], ids=["H256-fp32", "H512-fp16", "H1760-fp16"])
def test_split_against_cudnn(H, B, dtype, split, no_tf32, monkeypatch):
    """The split kernels (the plan's S, and S forced to 2 and 3) against cuDNN, forward and backward,
    both judged against float64."""
    from fused_birnn.kernels import launch

    if split is None:
        monkeypatch.delenv(launch.SPLIT_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.SPLIT_ENV, str(split))
    I, L, T = 64, 1, 64
    ref64, cudnn, ours = against_cudnn(I, H, L, dtype)
    x, h0, g_out, g_hn = (torch.randn(*shape, device="cuda", dtype=torch.float64)
                          for shape in ((T, B, I), (2 * L, B, H), (T, B, 2 * H), (2 * L, B, H)))
    expected = grads_of(ref64, x, h0, g_out, g_hn)
    theirs = grads_of(cudnn, x.to(dtype), h0.to(dtype), g_out, g_hn)
    mine = grads_of(ours, x.to(dtype), h0.to(dtype), g_out, g_hn)
    launch.check_errors("cuda")
    assert_no_worse_than_cudnn(expected, theirs, mine, dtype)


@pytest.mark.parametrize("split", ["2", "4"])
def test_split_back_to_back_launches_bitwise_equal(split, monkeypatch):
    """1,000 back-to-back forward launches of the persistent split kernel (barrier counters reset on the
    device each launch) give bitwise the same output; no error is flagged."""
    from fused_birnn.kernels import launch
    from fused_birnn.kernels.forward import birnn_forward

    monkeypatch.setenv(launch.SPLIT_ENV, split)
    T, B, H, D = 16, 8, 512, 2
    x_proj = torch.randn(T, B, D * H, device="cuda", dtype=torch.float16)
    w_hh = (torch.randn(D, H, H, device="cuda") / H ** 0.5).half()
    h0 = torch.randn(D, B, H, device="cuda", dtype=torch.float16)
    outs = [torch.empty_like(x_proj) for _ in range(2)]
    h_n = torch.empty_like(h0)
    birnn_forward(x_proj, w_hh, h0, outs[0], h_n, relu=False)
    for _ in range(1000):
        birnn_forward(x_proj, w_hh, h0, outs[1], h_n, relu=False)
        assert torch.equal(outs[0], outs[1])  # syncs: each launch checked
    launch.check_errors("cuda")


def test_split_beside_a_busy_kernel_on_another_stream(monkeypatch):
    """The persistent split kernel while a long GEMM loop runs on another stream (fewer free SMs): the
    plan's margin keeps it resident, or it ends in the documented error; it never hangs or returns
    silently wrong numbers."""
    from fused_birnn.kernels import launch

    monkeypatch.delenv(launch.SPLIT_ENV, raising=False)
    m = fused_birnn.RNN(128, 1024, 1, bidirectional=True, device="cuda", dtype=torch.float16)
    ref = fused_birnn.RNN(128, 1024, 1, bidirectional=True, device="cuda", backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(64, 32, 128, device="cuda", dtype=torch.float16)
    busy = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    with torch.cuda.stream(busy):
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
    out, _ = m(x)
    try:
        launch.check_errors("cuda")
    except RuntimeError as e:
        assert "never arrived" in str(e) and torch.isnan(out).any()
        return
    with torch.no_grad():
        r_out, _ = ref(x.float())
    torch.testing.assert_close(out.float(), r_out, atol=2e-2, rtol=2e-2)


def test_split_plan_larger_than_the_device_ends_in_the_error():
    """A persistent grid far larger than one wave (forced by an explicit config): the resident programs
    give up after max_spins polls, the late ones see the abort; outputs NaN from the failed step on and
    a RuntimeError naming the cause, not a hang."""
    from fused_birnn.kernels import launch
    from fused_birnn.kernels.config import RecurrenceConfig
    from fused_birnn.kernels.forward import birnn_forward

    T, B, H, D = 8, 256, 4096, 2
    # not cooperative: a cooperative launch of this grid is refused and runs per step instead
    # (tests/test_cuda_plans.py); here the bounded barrier wait is what is checked
    cfg = RecurrenceConfig(16, 16, False, split=256, block_k=64, persistent=True, max_spins=20_000,
                           cooperative=False)
    x_proj = torch.randn(T, B, D * H, device="cuda", dtype=torch.float16)
    w_hh = (torch.randn(D, H, H, device="cuda") / H ** 0.5).half()
    h0 = torch.zeros(D, B, H, device="cuda", dtype=torch.float16)
    out, h_n = torch.zeros_like(x_proj), torch.empty_like(h0)
    birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False, config=cfg)  # 8,192 programs
    with pytest.raises(RuntimeError, match="never arrived"):
        launch.check_errors("cuda")
    assert torch.isnan(h_n).any()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_model_on_a_non_current_device():
    """The model on cuda:1 while cuda:0 is current: the launches run on cuda:1 (Triton launches on the
    current device: the launchers switch to the tensors' device)."""
    torch.cuda.set_device(0)
    m = fused_birnn.RNN(16, 64, 2, bidirectional=True, device="cuda:1", backend="triton")
    ref = fused_birnn.RNN(16, 64, 2, bidirectional=True, device="cuda:1", backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(9, 4, 16, device="cuda:1", requires_grad=True)
    out, hn = m(x)
    out.sum().backward()
    assert torch.cuda.current_device() == 0
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x)[0], atol=1e-3, rtol=1e-3)
    assert torch.isfinite(x.grad).all()


def test_device_guard_with_a_current_device_of_another_index():
    """On one GPU the guard is the identity; the launch under `torch.cuda.device(x.device)` still works
    when the model names the device by index."""
    m = fused_birnn.RNN(16, 64, 1, bidirectional=True, device=torch.device("cuda", 0), backend="triton")
    out, _ = m(torch.randn(5, 3, 16, device="cuda:0"))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("split", ["1", "3"])
def test_sanitizer_small_split(split, monkeypatch):
    """A small forward + backward through the split kernel: what bench/gpu_run.sh runs under
    compute-sanitizer (racecheck, synccheck)."""
    from fused_birnn.kernels import launch

    monkeypatch.setenv(launch.SPLIT_ENV, split)
    m = fused_birnn.RNN(8, 96, 1, bidirectional=True, device="cuda", dtype=torch.float16)
    x = torch.randn(6, 5, 8, device="cuda", dtype=torch.float16, requires_grad=True)
    out, hn = m(x)
    (out.float().sum() + hn.float().sum()).backward()
    launch.check_errors("cuda")
    assert torch.isfinite(x.grad).all()
