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


def test_config_table():
    """What select_config promises on the default device (an A100): legal dot shapes, every unit owned
    by one program, one program per group on chip up to the byte limit, S programs above it."""
    from fused_birnn.kernels.config import DEFAULT_LIMITS, onchip_shared_bytes, streamed_shared_bytes

    for H in (1, 7, 50, 100, 128, 200, 256, 257, 300, 512, 1000, 1760, 2560):
        for B in (1, 5, 64, 1024, 5000):
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                for tf32 in (False, True):
                    c = select_config(H, B, dt, tf32)
                    c.check(H)
                    S, U = c.programs_per_group(H), c.units_per_program(H)
                    assert c.block_b >= 16 and c.block_h >= 16 and c.k_block(H) >= 16
                    assert S * U >= H and U <= c.block_h
                    if S == 1:  # one program per group: W_hh padded to block_h (on chip but for tiny
                        assert c.block_h >= H  # exact-fp32 layers with 64-row tiles)
                        assert c.w_on_chip or (dt == torch.float32 and not tf32 and H <= 16)
                    if c.w_on_chip:
                        assert onchip_shared_bytes(c.block_b, c.block_h, dt.itemsize, c.num_stages, False,
                                                   c.k_block(H)) <= DEFAULT_LIMITS.shared_per_block
                    else:
                        assert streamed_shared_bytes(c.block_b, c.block_h, c.k_block(H), dt.itemsize) \
                            <= DEFAULT_LIMITS.shared_per_block
                    if dt == torch.float32 and not tf32 and S > 1:  # FMA dots: 16-wide tiles only
                        assert c.block_h == 16 and c.k_block(H) == 16
                    if dt != torch.float32 and H <= 256:  # 16-bit, <= 128 KiB of W_hh: one program
                        assert S == 1
                    assert c.block_b <= 64 and (S == 1 or c.runs_persistent(H, 100) == c.persistent)
    assert select_config(256, 64, torch.float16).programs_per_group(256) == 1
    assert select_config(256, 64, torch.float32, True).programs_per_group(256) > 1
    assert select_config(128, 5, torch.float32, True).programs_per_group(128) == 1
    assert select_config(128, 5, torch.float32).programs_per_group(128) > 1


def test_plans_fit_the_device_shared_memory():
    """sm_86/sm_89/sm_120 allow 101,376 B per block: fp16 H=256 in one program (139,264 B) and the 3-stage
    TF32 on-chip backward at H=128 (106,496 B) must not be planned there; sm_80/sm_90 keep them."""
    from fused_birnn.kernels.config import DeviceLimits, onchip_shared_bytes, streamed_shared_bytes

    sm86, sm80 = DeviceLimits.for_arch(86), DeviceLimits.for_arch(80)
    assert select_config(256, 32, torch.float16, False, sm86).programs_per_group(256) > 1
    assert select_config(256, 32, torch.float16, False, sm80).programs_per_group(256) == 1
    c = select_config(128, 32, torch.float32, True, sm86)
    assert c.w_on_chip and c.programs_per_group(128) == 1 and c.num_stages == 1
    assert select_config(128, 32, torch.float32, True, sm80).num_stages is None
    for limits in (sm86, sm80, DeviceLimits.for_arch(89), DeviceLimits.for_arch(90)):
        for H in (7, 50, 100, 128, 200, 256, 512, 1760):
            for dt in (torch.float16, torch.float32):
                c = select_config(H, 32, dt, True, limits)
                k = c.k_block(H)
                if c.w_on_chip:
                    for fwd in (True, False):
                        assert onchip_shared_bytes(c.block_b, c.block_h, dt.itemsize, c.num_stages, fwd, k) \
                            <= limits.shared_per_block
                else:
                    assert streamed_shared_bytes(c.block_b, c.block_h, k, dt.itemsize) <= limits.shared_per_block
