"""Backward recurrence (BPTT) of a bidirectional Elman RNN layer: both directions in one launch, each
recurrence split across SPLIT cooperating programs.

With `z_t = x_proj_t + h_{t-1} @ W^T` and `h_t = act(z_t)`, walking each direction's own order
backwards:

    g       = grad_out[t] + dh            (dh: gradient flowing in from the direction's next step)
    dz_t    = g * act'(z_t)               (act' from the stored output h_t: cell.cell_backward)
    dh      = dz_t @ W                    (gradient into h_{t-1}; after the last step it is grad_h0)

Direction 0 walks t = T-1 .. 0, direction 1 walks t = 0 .. T-1 (its forward order was reversed), in one
launch, each writing its own half of one `[T, B, D*H]` `grad_pre` buffer. With lengths, a row's `dh`
stays `grad_h_n` until the walk reaches the row's last processed step, mirroring the forward's
activity mask. Everything else is matrix products the caller does on `grad_pre` (dW_hh, dW_ih, biases,
grad_input): no reduction happens here, so there are no atomics on data and the result is bitwise
deterministic.

The split mirrors kernels/forward.py: program p of a group owns the units [p*U, p*U + U) of `dh`. Per
step it computes dz for its units from its own `dh` (local), writes `grad_pre[t]`, publishes dz to
`xch[r % 2]`, meets the group at the barrier (or the launch ends), reads the group's whole dz back and
multiplies it by its columns of W_hh, `W[:, p*U:(p+1)*U]`: on chip (`W_ON_CHIP`, zero-padded to
[BLOCK_K, BLOCK_N], loaded once) or streamed from L2 in BLOCK_K chunks. SPLIT = 1 with `BARRIER=True`
keeps dz in registers: the one-program-per-group on-chip kernel. Errors as in kernels/forward.py:
`grad_pre` and `grad_h0` are NaN from the failed step on and the error flag is set.

Buffers (last dimension contiguous; index math in int64):
    out       [T, B, D*H]  forward states h_t (read)
    grad_out  [T, B, D*H]  gradient of the layer output (read)
    w         on chip: [D, SPLIT, BLOCK_N, BLOCK_K] zero-padded row slices of W_hh^T (column slices of
              W_hh); streamed: W_hh [D, H, stride_w] (rows padded as in forward.py)
    grad_pre  [T, B, D*H]  dz_t, the gradient of the pre-activations (written)
    grad_h0   [D, B, H]    gradient of the initial states (written)
    lengths   [B]          optional valid lengths, as in forward.py
    dh        [D, B, H]    running dh (fp32; fp64 for fp64): the launcher writes grad_h_n into it, each
                           launch reads its programs' units at its start and writes them at its end
    xch       [2, D, B, H] exchange buffer of dz (input dtype: dz is rounded to it for the dot anyway)
    sync, err              as in forward.py

Grid: (SPLIT, cdiv(B, BLOCK_B), D); a launch runs iterations [r_begin, min(r_end, n_steps + 1)), iteration r
finishing step r - 1 (dh from the exchanged dz) and starting step r (dz, published): the exchange sits
inside the iteration, so the launch-per-step mode needs n_steps + 1 launches.
Verified like forward.py, plus `torch.autograd.gradcheck` in float64 (tests/test_gradients.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .cell import cell_backward
from .config import RecurrenceConfig, device_limits, select_config
from .forward import check_buffers, common_kwargs, device_guard
from .indexing import sequence_lengths, step_time
from .exchange import load_exchanged
from .sync import group_barrier


@triton.jit(do_not_specialize=["T", "r_begin", "r_end", "max_spins"])
def birnn_bwd_kernel(
    out_ptr, grad_out_ptr, w_ptr, grad_pre_ptr, grad_h0_ptr, lengths_ptr, dh_ptr, xch_ptr, sync_ptr, err_ptr,
    T, B, H, U, stride_w, r_begin, r_end, max_spins,
    stride_ot, stride_ob,
    stride_got, stride_gob,
    stride_gpt, stride_gpb,
    stride_gh0d, stride_gh0b,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    W_ON_CHIP: tl.constexpr, BARRIER: tl.constexpr,
):
    """One program: the units [p*U, p*U + U) of `dh` for BLOCK_B rows of one direction, processing
    steps walked backwards from the group's longest row's last; iterations [r_begin, min(r_end,
    n_steps + 1)) (iteration r finishes step r - 1 and starts step r). A row
    keeps `dh = grad_h_n` until the walk reaches its last step."""
    p = tl.program_id(0)
    pid_b = tl.program_id(1)
    direction = tl.program_id(2)
    D = tl.num_programs(2)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    units = p * U + offs_n
    mask_n = (offs_n < U) & (units < H)
    mask_b = offs_b < B
    mask_bn = mask_b[:, None] & mask_n[None, :]
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)
    n_steps = tl.max(seq_len, axis=0)
    KEEP: tl.constexpr = SPLIT == 1 and BARRIER and W_ON_CHIP  # dz of the whole group in registers

    if W_ON_CHIP:  # W_hh[d][j, p*U + n] as w[j, n], the dot's right operand, for every step
        w_base = w_ptr + ((direction * SPLIT + p) * BLOCK_N).to(tl.int64) * BLOCK_K
        w = tl.load(w_base + offs_n[None, :] * BLOCK_K + offs_k[:, None])
    w_cols = w_ptr + direction.to(tl.int64) * H * stride_w + units[None, :]  # streamed: W_hh[d] columns

    half = D.to(tl.int64) * B * H
    state = direction.to(tl.int64) * B * H + offs_b[:, None] * H
    xch_rows = xch_ptr + state
    dh_ptrs = dh_ptr + state + units[None, :]
    bar = sync_ptr + direction * tl.num_programs(1) + pid_b
    col = direction * H + units
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + col[None, :]
    go_ptrs = grad_out_ptr + offs_b[:, None] * stride_gob + col[None, :]
    gp_ptrs = grad_pre_ptr + offs_b[:, None] * stride_gpb + col[None, :]

    dh_own = tl.load(dh_ptrs, mask=mask_bn, other=0.0)  # written by this program only: no exchange
    aborted = (r_begin < 0).to(tl.int32)
    # Iteration r finishes step r - 1 (dh from its dz: the exchange of the whole group's dz sits between
    # the two halves, so the launch boundary of the launch-per-step mode can be that barrier) and starts
    # step r (dz, published); n_steps + 1 iterations, the last one only finishing. KEEP (one program,
    # dz in registers) finishes each step in the same iteration: n_steps iterations.
    LAST: tl.constexpr = 0 if KEEP else 1
    for r in range(r_begin, tl.minimum(r_end, n_steps + LAST)):
        r_rows = tl.zeros_like(seq_len) + r  # per row: the interpreter mis-broadcasts 0-d & 1-d masks
        if not KEEP:
            _, active_prev = step_time(n_steps - r, direction, n_steps, seq_len)
            active_prev = active_prev & (r_rows > 0)
            prev = xch_rows + ((r + 1) % 2) * half  # dz of step r - 1
            if W_ON_CHIP:
                dz_all = load_exchanged(prev + offs_k[None, :], mask_b[:, None] & (offs_k < H)[None, :])
                dh_new = tl.dot(dz_all.to(w.dtype), w, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:  # chunks of dz and of W's columns, chunk k + 1 prefetched by hand (num_stages=1: forward.py)
                dh_new = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
                dz_next = load_exchanged(prev + offs_k[None, :], mask_b[:, None] & (offs_k < H)[None, :])
                w_next = tl.load(w_cols + offs_k[:, None] * stride_w, mask=(offs_k < H)[:, None] & mask_n[None, :],
                                 other=0.0)
                for k0 in range(0, H, BLOCK_K):
                    dz_j, w_j = dz_next, w_next
                    js = k0 + BLOCK_K + offs_k
                    mask_j = js < H
                    dz_next = load_exchanged(prev + js[None, :], mask_b[:, None] & mask_j[None, :])
                    w_next = tl.load(w_cols + js[:, None] * stride_w, mask=mask_j[:, None] & mask_n[None, :],
                                     other=0.0)
                    dh_new = tl.dot(dz_j.to(w_j.dtype), w_j, acc=dh_new, input_precision=INPUT_PRECISION,
                                    out_dtype=ACC_DTYPE)
            dh_own = tl.where(active_prev[:, None], dh_new, dh_own)
            if SPLIT > 1 and BARRIER:
                dh_own = tl.where(aborted != 0, float("nan"), dh_own)

        t, active = step_time(n_steps - 1 - r, direction, n_steps, seq_len)
        active = active & (r_rows < n_steps)
        m = active[:, None] & mask_n[None, :]
        h = tl.load(o_ptrs + t * stride_ot, mask=m, other=0.0).to(ACC_DTYPE)
        g = dh_own + tl.load(go_ptrs + t * stride_got, mask=m, other=0.0).to(ACC_DTYPE)
        dz = cell_backward(g, h, RELU)
        tl.store(gp_ptrs + t * stride_gpt, dz.to(grad_pre_ptr.dtype.element_ty), mask=m)
        if KEEP:  # the one-program kernel: dh of the whole group right away
            dh_new = tl.dot(dz.to(w.dtype), w, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            dh_own = tl.where(active[:, None], dh_new, dh_own)
        else:  # publish dz of step r; the whole group's comes back after the barrier
            tl.store(xch_rows + (r % 2) * half + units[None, :], dz.to(xch_ptr.dtype.element_ty),
                     mask=mask_bn & (r_rows < n_steps)[:, None])
            if SPLIT > 1 and BARRIER:
                aborted = group_barrier(bar, (r - r_begin + 1) * SPLIT, max_spins, err_ptr, aborted)

    tl.store(dh_ptrs, dh_own, mask=mask_bn)  # for the next launch (one launch per step)
    if (r_begin <= n_steps) & (r_end >= n_steps + LAST):  # this launch finished the group's last step
        tl.store(grad_h0_ptr + direction * stride_gh0d + offs_b[:, None] * stride_gh0b + units[None, :],
                 dh_own.to(grad_h0_ptr.dtype.element_ty), mask=mask_bn)




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
    """Launch the backward recurrence (all directions, SPLIT programs per group); `grad_pre` and
    `grad_h0` are written in place. Shapes as in the module docstring; last dimensions contiguous,
    `w_hh` contiguous. With `lengths` (as in `birnn_forward`) only valid steps of `grad_pre` are
    written: pass it zero-filled. Raises RuntimeError if an earlier persistent split launch on this
    device failed (kernels/launch.py)."""
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
    device = out.device
    cfg = config or select_config(H, B, out.dtype, allow_tf32, device_limits(device), launch.split_override())
    cfg.check(H)
    S, U, n_tiles = cfg.programs_per_group(H), cfg.units_per_program(H), cfg.num_batch_tiles(B)
    persistent = cfg.runs_persistent(H, T)
    common = common_kwargs(cfg, H, out.dtype, allow_tf32, relu, lengths is not None, forward=False)
    with device_guard(out):  # Triton launches on the current device: make it the tensors' device
        launch.raise_pending(device)
        w = (launch.slices(w_hh.transpose(1, 2), S, U, cfg.block_h, cfg.k_block(H)) if cfg.w_on_chip
             else launch.row_padded(w_hh))
        dh = torch.empty((D, B, H), device=device,
                         dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
        dh.copy_(grad_h_n)
        xch = out.new_zeros((2, D, B, H))  # zeros: iteration 0 multiplies a (masked-out) dz
        sync = torch.zeros(D * n_tiles, dtype=torch.int32, device=device)
        err = launch.error_flag(device)
        args = (out, grad_out, w, grad_pre, grad_h0, lengths, dh, xch, sync, err, T, B, H, U, w.stride(-2))
        after = (out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
                 grad_pre.stride(0), grad_pre.stride(1), grad_h0.stride(0), grad_h0.stride(1))
        launch.run_steps(birnn_bwd_kernel,
                         (S, n_tiles, D), args, after, T + 1, persistent, cfg.spin_limit(), common)
        if persistent and S > 1:
            launch.after_launch(device)
