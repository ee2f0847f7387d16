"""fused_birnn.RNN against nn.RNN run in float64 on the same weights: outputs, h_n and the gradients of
input, hx and every parameter, on both CPU paths (the kernels interpreted, and pure PyTorch)."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close

import fused_birnn
import fused_birnn.kernels.backward as kbwd
import fused_birnn.kernels.forward as kfwd
from fused_birnn.kernels.config import RecurrenceConfig

# (input_size, hidden_size, num_layers, bidirectional, nonlinearity, bias, batch_first, T, B)
CONFIGS = {
    "seed": (25, 50, 4, True, "tanh", True, True, 5, 15),  # nn.RNN(25, 50, 4, batch_first=True, bidirectional=True)
    "H7-B1-T1": (7, 7, 1, True, "tanh", True, False, 1, 1),
    "I1-relu-nobias": (1, 7, 2, True, "relu", False, False, 6, 5),
    "uni-3layer-bf": (4, 50, 3, False, "tanh", True, True, 3, 5),
    "two-batch-tiles": (3, 16, 2, True, "relu", True, False, 4, 17),
    "uni-relu-H33": (5, 33, 1, False, "relu", True, False, 7, 2),
    "bi-4layer-relu-nobias": (6, 9, 4, True, "relu", False, True, 3, 3),
}


def make_pair(cfg, dtype, backend):
    I, H, L, bi, nl, bias, bf, T, B = cfg
    ref = torch.nn.RNN(I, H, L, nonlinearity=nl, bias=bias, batch_first=bf, bidirectional=bi, dtype=torch.float64)
    ours = fused_birnn.RNN(I, H, L, nonlinearity=nl, bias=bias, batch_first=bf, bidirectional=bi,
                           dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(model, x, hx, grad_out, grad_hn):
    """Forward, then the gradients of <out, grad_out> + <h_n, grad_hn> w.r.t. input, hx, parameters."""
    x = x.detach().requires_grad_()
    hx = None if hx is None else hx.detach().requires_grad_()
    out, hn = model(x, hx) if hx is not None else model(x)
    inputs = [x] + ([hx] if hx is not None else []) + list(model.parameters())
    grads = torch.autograd.grad((out * grad_out.to(out.dtype)).sum() + (hn * grad_hn.to(hn.dtype)).sum(), inputs)
    return out, hn, grads


def check_parity(cfg, dtype, backend, hx_given=True, unbatched=False):
    I, H, L, bi, nl, bias, bf, T, B = cfg
    D = 2 if bi else 1
    ref, ours = make_pair(cfg, dtype, backend)
    if unbatched:
        x = torch.randn(T, I, dtype=torch.float64)
        hx = torch.randn(L * D, H, dtype=torch.float64) if hx_given else None
        go = torch.randn(T, D * H, dtype=torch.float64)
        ghn = torch.randn(L * D, H, dtype=torch.float64)
    else:
        x = torch.randn((B, T, I) if bf else (T, B, I), dtype=torch.float64)
        hx = torch.randn(L * D, B, H, dtype=torch.float64) if hx_given else None
        go = torch.randn((B, T, D * H) if bf else (T, B, D * H), dtype=torch.float64)
        ghn = torch.randn(L * D, B, H, dtype=torch.float64)
    r_out, r_hn, r_grads = run(ref, x, hx, go, ghn)
    o_out, o_hn, o_grads = run(ours, x.to(dtype), None if hx is None else hx.to(dtype), go, ghn)
    assert o_out.dtype == dtype and o_out.shape == r_out.shape and o_hn.shape == r_hn.shape
    names = ["output", "h_n", "grad of input"] + (["grad of hx"] if hx is not None else []) + [
        f"grad of {n}" for n, _ in ours.named_parameters()]
    ours_all, ref_all = [o_out, o_hn, *o_grads], [r_out, r_hn, *r_grads]
    if dtype in (torch.float16, torch.bfloat16):
        # half precision: no worse than nn.RNN itself in that dtype (both against float64), whose
        # weight gradients through 4 layers are off by ~2e-2 in fp16
        half_ref = torch.nn.RNN(I, H, L, nonlinearity=nl, bias=bias, batch_first=bf, bidirectional=bi, dtype=dtype)
        half_ref.load_state_dict(ref.state_dict())
        h_out, h_hn, h_grads = run(half_ref, x.to(dtype), None if hx is None else hx.to(dtype), go, ghn)
        for name, a, r, h in zip(names, ours_all, ref_all, [h_out, h_hn, *h_grads], strict=True):
            err, half_err = (a.double() - r).abs().max().item(), (h.double() - r).abs().max().item()
            assert err <= 2 * half_err + 1e-3, f"{name}: error {err:.2e}, nn.RNN {dtype}: {half_err:.2e}"
        return
    for name, a, r in zip(names, ours_all, ref_all, strict=True):
        assert a.shape == r.shape, name
        assert_close(a, r, dtype, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name, hx_given, dtype, backend):
    check_parity(CONFIGS[name], dtype, backend, hx_given)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["seed", "I1-relu-nobias"])
def test_parity_fp16(name, backend):
    """fp16 storage, fp32 accumulation (tl.dot on fp16 is exact in the interpreter)."""
    check_parity(CONFIGS[name], torch.float16, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("name", ["seed", "uni-relu-H33"])
def test_parity_unbatched(name, hx_given, backend):
    check_parity(CONFIGS[name], torch.float64, backend, hx_given, unbatched=True)


@pytest.mark.skipif(not fused_birnn.functional.INTERPRETER, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("block_h", [16, 32])
@pytest.mark.parametrize("name", ["seed", "two-batch-tiles", "uni-relu-H33"])
def test_parity_streamed_w_hh(name, block_h, monkeypatch):
    """The streamed-W_hh kernels (chosen for large H on a GPU) forced at small H: several hidden tiles,
    a partial last tile and the fp32 ping-pong workspace, through the whole module."""
    cfg = RecurrenceConfig(block_b=16, block_h=block_h, w_on_chip=False)
    monkeypatch.setattr(kfwd, "select_config", lambda *a: cfg)
    monkeypatch.setattr(kbwd, "select_config", lambda *a: cfg)
    check_parity(CONFIGS[name], torch.float64, "triton")
    check_parity(CONFIGS[name], torch.float32, "triton", hx_given=False)
