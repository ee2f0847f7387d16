"""The recurrence kernels called directly: both memory strategies against a float64 loop, odd sizes,
and guard regions (the interpreter does not bounds-check, NOTES 2: outputs are placed inside larger
NaN-filled buffers and everything outside their region must stay NaN)."""

import pytest
import torch

from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels.backward import birnn_backward
from fused_birnn.kernels.config import RecurrenceConfig, select_config
from fused_birnn.kernels.forward import birnn_forward
from fused_birnn.torch_backend import recurrence_backward, recurrence_forward

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")

SHAPES = [(5, 3, 7, 2), (1, 5, 50, 2), (4, 17, 33, 1), (3, 1, 1, 2), (2, 33, 16, 2)]  # (T, B, H, D)
# the plan (one program per group here), W_hh slices streamed in 16-wide chunks by cdiv(H, 16) programs,
# and 2 programs per group with 32-row tiles and on-chip slices (more than one program: launch per step)
CONFIGS = [None, RecurrenceConfig(16, 16, False), RecurrenceConfig(32, 32, True, num_warps=2, split=2)]


def loop_reference(x_proj, w_hh, h0, relu):
    """The definition, one direction and one step at a time."""
    T, B, DH = x_proj.shape
    D, H = w_hh.shape[:2]
    out = torch.empty_like(x_proj)
    h_n = torch.empty_like(h0)
    for d in range(D):
        h = h0[d]
        for t in (range(T) if d == 0 else reversed(range(T))):
            z = x_proj[t, :, d * H:(d + 1) * H] + h @ w_hh[d].T
            h = torch.relu(z) if relu else torch.tanh(z)
            out[t, :, d * H:(d + 1) * H] = h
        h_n[d] = h
    return out, h_n


PAD = 3


def guarded(shape, dtype):
    """A NaN-filled buffer with PAD extra elements on every side of every dim, and the view inside."""
    big = torch.full([s + 2 * PAD for s in shape], float("nan"), dtype=dtype)
    return big, big[tuple(slice(PAD, PAD + s) for s in shape)]


def assert_guard_untouched(big, view):
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[tuple(slice(PAD, PAD + s) for s in view.shape)] = False
    assert torch.isnan(big[outside]).all(), "a kernel wrote outside its output region"
    assert not torch.isnan(view).any(), "a kernel left part of its output unwritten"


@pytest.mark.parametrize("config", CONFIGS, ids=["selected", "streamed16", "split2-onchip32"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-H{}-D{}".format(*s))
def test_forward_and_backward_kernels(shape, relu, config):
    T, B, H, D = shape
    dt = torch.float64
    x_proj = torch.randn(T, B, D * H, dtype=dt, requires_grad=True)
    w_hh = (torch.randn(D, H, H, dtype=dt) / H ** 0.5).requires_grad_()
    h0 = torch.randn(D, B, H, dtype=dt, requires_grad=True)
    ref_out, ref_hn = loop_reference(x_proj, w_hh, h0, relu)
    g_out, g_hn = torch.randn_like(ref_out), torch.randn_like(ref_hn)
    ref_gx, ref_gh0 = torch.autograd.grad((ref_out * g_out).sum() + (ref_hn * g_hn).sum(), (x_proj, h0))

    big_out, out = guarded((T, B, D * H), dt)
    big_hn, h_n = guarded((D, B, H), dt)
    birnn_forward(x_proj.detach(), w_hh.detach(), h0.detach(), out, h_n, relu=relu, config=config)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_n, ref_hn, atol=1e-12, rtol=1e-12)
    assert_guard_untouched(big_out, out)
    assert_guard_untouched(big_hn, h_n)

    big_gp, grad_pre = guarded((T, B, D * H), dt)
    big_gh0, grad_h0 = guarded((D, B, H), dt)
    birnn_backward(out, g_out, g_hn, w_hh.detach(), grad_pre, grad_h0, relu=relu, config=config)
    torch.testing.assert_close(grad_pre, ref_gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_h0, ref_gh0, atol=1e-12, rtol=1e-12)
    assert_guard_untouched(big_gp, grad_pre)
    assert_guard_untouched(big_gh0, grad_h0)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "T{}-B{}-H{}-D{}".format(*s))
def test_torch_backend_matches_kernels_contract(shape):
    """The pure-PyTorch recurrence honours the same buffers (same reference, same gradients)."""
    T, B, H, D = shape
    dt = torch.float64
    x_proj = torch.randn(T, B, D * H, dtype=dt)
    w_hh = torch.randn(D, H, H, dtype=dt) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=dt)
    out, h_n = recurrence_forward(x_proj, w_hh, h0, relu=False)
    ref_out, ref_hn = loop_reference(x_proj, w_hh, h0, False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_hn)
    g_out, g_hn = torch.randn_like(out), torch.randn_like(h_n)
    gp, gh0 = recurrence_backward(out, g_out, g_hn, w_hh, relu=False)
    gp_k, gh0_k = torch.empty_like(gp), torch.empty_like(gh0)
    birnn_backward(out, g_out, g_hn, w_hh, gp_k, gh0_k, relu=False)
    torch.testing.assert_close(gp, gp_k)
    torch.testing.assert_close(gh0, gh0_k)


def test_strided_views_of_larger_buffers():
    """x_proj / out as views with a time stride larger than B * D*H (e.g. slices of a bigger buffer)."""
    T, B, H, D = 4, 3, 5, 2
    x_big = torch.randn(T, B + 2, D * H, dtype=torch.float64)
    x_proj = x_big[:, 1:B + 1]
    w_hh = torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=torch.float64)
    big, out = guarded((T, B, D * H), torch.float64)
    h_n = torch.empty(D, B, H, dtype=torch.float64)
    birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False)
    ref_out, ref_hn = loop_reference(x_proj, w_hh, h0, False)
    torch.testing.assert_close(out, ref_out)
    assert_guard_untouched(big, out)
