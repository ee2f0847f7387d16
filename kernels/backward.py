"""Backward recurrence (BPTT) of a bidirectional Elman RNN layer: both directions in one launch.

With `z_t = x_proj_t + h_{t-1} @ W^T` and `h_t = act(z_t)`, walking each direction's own order
backwards:

    g       = grad_out[t] + dh            (dh: gradient flowing in from the direction's next step)
    dz_t    = g * act'(z_t)               (act' from the stored output h_t: cell.activation_grad_from_output)
    dh      = dz_t @ W                    (gradient into h_{t-1}; after the last step it is grad_h0)

Direction 0 walks t = T-1 .. 0, direction 1 walks t = 0 .. T-1 (its forward order was reversed), in one
launch (direction is grid axis 1), each writing its own half of one `[T, B, D*H]` `grad_pre` buffer.
With lengths, a row's `dh` stays `grad_h_n` until the walk reaches the row's last processed step
(forward: its last valid step; reverse: t = 0 is last for every row, and a row stops after its own
first processed step, t = length - 1), exactly mirroring the forward's activity mask.
Everything else is matrix products the caller does on `grad_pre` (dW_hh, dW_ih, biases, grad_input):
no reduction happens here, so there are no atomics and the result is bitwise deterministic.

Buffers (last dimension contiguous; index math in int64):
    out       [T, B, D*H]  forward states h_t (read)
    grad_out  [T, B, D*H]  gradient of the layer output (read)
    grad_h_n  [D, B, H]    gradient of the final states (read)
    w_hh      [D, H, H]    W_hh[d][j, k] (contiguous; zero-padded to [D, BLOCK_H, BLOCK_H] on chip)
    grad_pre  [T, B, D*H]  dz_t, the gradient of the pre-activations (written)
    grad_h0   [D, B, H]    gradient of the initial states (written)
    lengths   [B]          optional valid lengths, as in forward.py
    ws_dz, ws_dh [D, B, H] fp32 workspaces of the streamed kernel

Grid: (cdiv(B, BLOCK_B), D), T a runtime argument, as in forward.py. Verified like forward.py, plus
`torch.autograd.gradcheck` in float64 through this kernel (tests/test_gradients.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cell import activation_grad_from_output
from .config import RecurrenceConfig, device_limits, select_config
from .forward import acc_dtype, check_buffers, device_guard, input_precision, pad_square
from .indexing import sequence_lengths, step_time


@triton.jit(do_not_specialize=["T"])
def birnn_bwd_onchip_kernel(
    out_ptr, grad_out_ptr, grad_h_n_ptr, w_hh_ptr, grad_pre_ptr, grad_h0_ptr, lengths_ptr,
    T, B, H,
    stride_ot, stride_ob,
    stride_got, stride_gob,
    stride_gpt, stride_gpb,
    stride_ghnd, stride_ghnb,
    stride_gh0d, stride_gh0b,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_B rows of one direction, its processing steps walked backwards from its
    longest row's last, `W_hh` (`w_hh_ptr`: zero-padded to `[D, BLOCK_H, BLOCK_H]`) on chip, the
    running `dh` in registers. A row keeps `dh = grad_h_n` until the walk reaches its last step."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = (offs_b < B)[:, None] & mask_h[None, :]
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)
    n_steps = tl.max(seq_len, axis=0)

    # W_hh[d] as the dot's right operand, unchanged: dh[k] = sum_j dz[j] * W[j, k] (zero-padded copy)
    w_base = w_hh_ptr + direction * BLOCK_H * BLOCK_H
    w = tl.load(w_base + offs_h[:, None] * BLOCK_H + offs_h[None, :])
    dh = tl.load(grad_h_n_ptr + direction * stride_ghnd + offs_b[:, None] * stride_ghnb + offs_h[None, :],
                 mask=mask, other=0.0).to(ACC_DTYPE)

    col = direction * H + offs_h
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + col[None, :]
    go_ptrs = grad_out_ptr + offs_b[:, None] * stride_gob + col[None, :]
    gp_ptrs = grad_pre_ptr + offs_b[:, None] * stride_gpb + col[None, :]
    for r in range(0, n_steps):
        t, active = step_time(n_steps - 1 - r, direction, n_steps, seq_len)
        m = active[:, None] & mask_h[None, :]
        h = tl.load(o_ptrs + t * stride_ot, mask=m, other=0.0).to(ACC_DTYPE)
        g = dh + tl.load(go_ptrs + t * stride_got, mask=m, other=0.0).to(ACC_DTYPE)
        dz = g * activation_grad_from_output(h, RELU)
        tl.store(gp_ptrs + t * stride_gpt, dz.to(grad_pre_ptr.dtype.element_ty), mask=m)
        dh_prev = tl.dot(dz.to(w.dtype), w, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dh = tl.where(active[:, None], dh_prev, dh)

    tl.store(grad_h0_ptr + direction * stride_gh0d + offs_b[:, None] * stride_gh0b + offs_h[None, :],
             dh.to(grad_h0_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def birnn_bwd_streamed_kernel(
    out_ptr, grad_out_ptr, grad_h_n_ptr, w_hh_ptr, grad_pre_ptr, grad_h0_ptr, lengths_ptr, ws_dz_ptr, ws_dh_ptr,
    T, B, H,
    stride_ot, stride_ob,
    stride_got, stride_gob,
    stride_gpt, stride_gpb,
    stride_ghnd, stride_ghnb,
    stride_gh0d, stride_gh0b,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_B rows of one direction, its processing steps walked backwards, any H. A step
    has two phases separated by CTA barriers: (1) per tile j, dz_j from dh_j (ws_dh) into grad_pre and
    ws_dz (0 for rows not yet active); (2) per tile k, dh_k = sum_j dz_j @ W[j, k] into ws_dh for the
    active rows only, `W_hh` tiles streamed from L2."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_H)
    mask_b = (offs_b < B)[:, None]
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)
    n_steps = tl.max(seq_len, axis=0)

    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    ws_off = direction.to(tl.int64) * B * H + offs_b[:, None] * H
    ws_dz = ws_dz_ptr + ws_off
    ws_dh = ws_dh_ptr + ws_off
    o_rows = out_ptr + offs_b[:, None] * stride_ob + direction * H
    go_rows = grad_out_ptr + offs_b[:, None] * stride_gob + direction * H
    gp_rows = grad_pre_ptr + offs_b[:, None] * stride_gpb + direction * H

    for j0 in range(0, H, BLOCK_H):  # ws_dh = grad_h_n
        cols = j0 + offs_t
        m = mask_b & (cols < H)[None, :]
        g = tl.load(grad_h_n_ptr + direction * stride_ghnd + offs_b[:, None] * stride_ghnb + cols[None, :],
                    mask=m, other=0.0)
        tl.store(ws_dh + cols[None, :], g.to(ACC_DTYPE), mask=m)
    tl.debug_barrier()

    for r in range(0, n_steps):
        t, active = step_time(n_steps - 1 - r, direction, n_steps, seq_len)
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + offs_t
            m = active[:, None] & (cols < H)[None, :]
            h = tl.load(o_rows + t * stride_ot + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
            g = tl.load(ws_dh + cols[None, :], mask=m, other=0.0)
            g += tl.load(go_rows + t * stride_got + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
            dz = g * activation_grad_from_output(h, RELU)
            tl.store(gp_rows + t * stride_gpt + cols[None, :], dz.to(grad_pre_ptr.dtype.element_ty), mask=m)
            tl.store(ws_dz + cols[None, :], dz, mask=mask_b & (cols < H)[None, :])  # 0 where inactive
        tl.debug_barrier()
        for k0 in range(0, H, BLOCK_H):
            cols_k = k0 + offs_t
            mask_k = cols_k < H
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
            for j0 in range(0, H, BLOCK_H):
                cols_j = j0 + offs_t
                mask_j = cols_j < H
                dz_j = tl.load(ws_dz + cols_j[None, :], mask=mask_b & mask_j[None, :], other=0.0)
                w = tl.load(w_base + cols_j[:, None] * H + cols_k[None, :],
                            mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                acc = tl.dot(dz_j.to(w.dtype), w, acc=acc, input_precision=INPUT_PRECISION,
                             out_dtype=ACC_DTYPE)
            tl.store(ws_dh + cols_k[None, :], acc, mask=active[:, None] & mask_k[None, :])
        tl.debug_barrier()

    for j0 in range(0, H, BLOCK_H):
        cols = j0 + offs_t
        m = mask_b & (cols < H)[None, :]
        g = tl.load(ws_dh + cols[None, :], mask=m, other=0.0)
        tl.store(grad_h0_ptr + direction * stride_gh0d + offs_b[:, None] * stride_gh0b + cols[None, :],
                 g.to(grad_h0_ptr.dtype.element_ty), mask=m)


def birnn_backward(
    out: torch.Tensor,
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    w_hh: torch.Tensor,
    grad_pre: torch.Tensor,
    grad_h0: torch.Tensor,
    *,
    relu: bool,
    lengths: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: RecurrenceConfig | None = None,
) -> None:
    """Launch the backward recurrence (one launch for all directions); `grad_pre` and `grad_h0` are
    written in place. Shapes as in the module docstring; last dimensions contiguous, `w_hh` contiguous.
    With `lengths` (as in `birnn_forward`) only valid steps of `grad_pre` are written: pass it
    zero-filled."""
    T, B, DH = out.shape
    D, H = w_hh.shape[0], w_hh.shape[1]
    check_buffers(DH == D * H and grad_out.shape == grad_pre.shape == out.shape
                  and grad_h_n.shape == grad_h0.shape == (D, B, H)
                  and (lengths is None or (lengths.shape == (B,) and lengths.device == out.device)),
                  "birnn_backward: shapes of out/grad_out/grad_pre [T, B, D*H], grad_h_n/grad_h0 [D, B, H], "
                  "lengths [B]")
    if T == 0 or B == 0:  # nothing to launch; an empty tensor's strides mean nothing (may be 0)
        grad_h0.copy_(grad_h_n)
        return
    check_buffers(w_hh.is_contiguous() and all(
        t.stride(-1) == 1 for t in (out, grad_out, grad_h_n, grad_pre, grad_h0)),
        "birnn_backward: w_hh contiguous and every buffer's last dimension contiguous")
    cfg = config or select_config(H, B, out.dtype, allow_tf32, device_limits(out.device))
    grid = (cfg.num_batch_tiles(B), D)
    common = dict(
        HAS_LENGTHS=lengths is not None, RELU=relu, ACC_DTYPE=acc_dtype(out.dtype), INPUT_PRECISION=input_precision(out.dtype, allow_tf32),
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.warps(forward=False),
        **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages}),
    )
    strides = (out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
               grad_pre.stride(0), grad_pre.stride(1), grad_h_n.stride(0), grad_h_n.stride(1),
               grad_h0.stride(0), grad_h0.stride(1))
    args = (out, grad_out, grad_h_n, w_hh, grad_pre, grad_h0, lengths)
    with device_guard(out):  # Triton launches on the current device: make it the tensors' device
        if cfg.w_on_chip:
            args = (out, grad_out, grad_h_n, pad_square(w_hh, cfg.block_h), grad_pre, grad_h0, lengths)
            birnn_bwd_onchip_kernel[grid](*args, T, B, H, *strides, **common)
        else:
            ws_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
            ws_dz = torch.empty((D, B, H), device=out.device, dtype=ws_dtype)
            ws_dh = torch.empty_like(ws_dz)
            birnn_bwd_streamed_kernel[grid](*args, ws_dz, ws_dh, T, B, H, *strides, **common)
