"""Forward recurrence of a bidirectional Elman RNN layer: both directions in one launch.

Per layer the input projection of both directions is one GEMM done by the caller,
`x_proj = x @ [W_ih_fwd; W_ih_rev]^T + (b_ih + b_hh)`, laid out `[T, B, D*H]`. These kernels run the
sequential part,

    h_t = act(x_proj[t, :, d*H:(d+1)*H] + h_{t-1} @ W_hh[d]^T)

for every direction `d` at once: direction is grid axis 1. Direction 0 walks t = 0 .. T-1 and starts from
`h0[0]`; direction 1 walks t = T-1 .. 0, so it reads the time-reversed input and writes its state of time
t back at time t (the "flip back" of PyTorch's definition costs nothing), starting from `h0[1]` before
it reads the last step. Both write into one `[T, B, D*H]` output buffer, forward into `[..., :H]`,
reverse into `[..., H:]`: no torch.cat, no flip. A unidirectional layer is the same launch with D = 1.

With per-row lengths (PackedSequence), each row stops at its own length and its reverse direction starts
at its own last valid step (kernels/indexing.py); a program runs only as many steps as its longest row,
so batches sorted by length skip most padding.

Fusion is legal because the two directions share no state: they only share the read-only input
projection and write disjoint halves of the output.

Buffers (last dimension contiguous; other strides are arguments, index math in int64 so T*B*H may
exceed 2**31):
    x_proj  [T, B, D*H]  input projection with both biases folded in (input dtype)
    w_hh    [D, H, H]    W_hh[d][j, k]: hidden unit j's weight on previous unit k (contiguous); the
                         on-chip kernel reads it zero-padded to [D, BLOCK_H, BLOCK_H] (`pad_square`)
    h0      [D, B, H]    initial states
    out     [T, B, D*H]  all states, written
    h_n     [D, B, H]    final state of each direction, written (direction 1's is its state at t = 0)
    lengths [B]          optional valid length of each row (int32/int64); None means T for all
    ws      [2, D, B, H] fp32 ping-pong workspace of the streamed kernel

Grid: (cdiv(B, BLOCK_B), D). One program owns BLOCK_B batch rows of one direction for all its steps; T is
a runtime argument (not specialised) so a new sequence length does not recompile. Accumulation is fp32
(fp64 for fp64 inputs); `tl.dot` takes the input dtype, TF32 for fp32 only when asked (cuDNN's switch).

Verified: parity with nn.RNN and a float64 reference under TRITON_INTERPRET=1 (tests/test_parity.py,
tests/test_kernels.py, tests/test_packed.py); compiled for sm_80 and sm_90 with shared memory, spill and tensor-core checks
(tests/test_compile.py).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .cell import activation
from .indexing import sequence_lengths, step_time
from .config import RecurrenceConfig, device_limits, select_config


@triton.jit(do_not_specialize=["T"])
def birnn_fwd_onchip_kernel(
    x_proj_ptr, w_hh_ptr, h0_ptr, out_ptr, h_n_ptr, lengths_ptr,
    T, B, H,
    stride_xt, stride_xb,
    stride_ot, stride_ob,
    stride_h0d, stride_h0b,
    stride_hnd, stride_hnb,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_B rows of one direction for the steps of its longest row, `W_hh`
    (`w_hh_ptr`: zero-padded to `[D, BLOCK_H, BLOCK_H]`) kept on chip and the state in registers.
    A row past its length keeps its state (that is its h_n) and stores nothing; padded columns stay
    exactly 0 (zero weights, zero input, act(0) = 0) and are never stored."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)

    # W_hh[d]^T as the dot's right operand, w_t[k, j] = W_hh[d, j, k], from the zero-padded
    # [D, BLOCK_H, BLOCK_H] copy: unmasked, vectorised loads (masked ones cost ~170 more registers)
    w_base = w_hh_ptr + direction * BLOCK_H * BLOCK_H
    w_t = tl.load(w_base + offs_h[None, :] * BLOCK_H + offs_h[:, None])
    mask = (offs_b < B)[:, None] & mask_h[None, :]
    h = tl.load(h0_ptr + direction * stride_h0d + offs_b[:, None] * stride_h0b + offs_h[None, :],
                mask=mask, other=0.0).to(ACC_DTYPE)

    col = direction * H + offs_h  # this direction's columns of the [.., D*H] buffers
    x_ptrs = x_proj_ptr + offs_b[:, None] * stride_xb + col[None, :]
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + col[None, :]
    n_steps = tl.max(seq_len, axis=0)
    for s in range(0, n_steps):
        t, active = step_time(s, direction, n_steps, seq_len)
        m = active[:, None] & mask_h[None, :]
        x = tl.load(x_ptrs + t * stride_xt, mask=m, other=0.0).to(ACC_DTYPE)
        z = tl.dot(h.to(w_t.dtype), w_t, acc=x, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_LENGTHS:  # a row outside its valid steps keeps its state
            h = tl.where(active[:, None], activation(z, RELU), h)
        else:
            h = activation(z, RELU)
        tl.store(o_ptrs + t * stride_ot, h.to(out_ptr.dtype.element_ty), mask=m)

    tl.store(h_n_ptr + direction * stride_hnd + offs_b[:, None] * stride_hnb + offs_h[None, :],
             h.to(h_n_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def birnn_fwd_streamed_kernel(
    x_proj_ptr, w_hh_ptr, h0_ptr, out_ptr, h_n_ptr, lengths_ptr, ws_ptr,
    T, B, H,
    stride_xt, stride_xb,
    stride_ot, stride_ob,
    stride_h0d, stride_h0b,
    stride_hnd, stride_hnb,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_B rows of one direction for the steps of its longest row, any H. Each step
    walks output tiles j and reduction tiles k of BLOCK_H, reading `W_hh` tiles from global memory (L2)
    and the previous state from ws[s % 2] (fp32), writing the new state to ws[(s + 1) % 2]. The
    program's threads exchange the state through global memory, so a CTA barrier closes every step (a
    no-op in the interpreter, which runs a program's statements in order anyway). An inactive row
    carries its state from ws[s % 2] to ws[(s + 1) % 2]. The same shape admits a hidden-tile grid axis later: j tiles split across programs, the barrier
    becoming grid-wide."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    D = tl.num_programs(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_H)  # offsets inside one hidden tile
    mask_b = (offs_b < B)[:, None]
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)

    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    ws_stride_p = D.to(tl.int64) * B * H  # one ping-pong half
    ws_rows = ws_ptr + direction.to(tl.int64) * B * H + offs_b[:, None] * H
    x_rows = x_proj_ptr + offs_b[:, None] * stride_xb + direction * H
    o_rows = out_ptr + offs_b[:, None] * stride_ob + direction * H
    h_n_rows = h_n_ptr + direction * stride_hnd + offs_b[:, None] * stride_hnb

    for j0 in range(0, H, BLOCK_H):  # ws[0] = h0 in fp32
        cols = j0 + offs_t
        m = mask_b & (cols < H)[None, :]
        h = tl.load(h0_ptr + direction * stride_h0d + offs_b[:, None] * stride_h0b + cols[None, :],
                    mask=m, other=0.0)
        tl.store(ws_rows + cols[None, :], h.to(ACC_DTYPE), mask=m)
    tl.debug_barrier()

    n_steps = tl.max(seq_len, axis=0)
    for s in range(0, n_steps):
        t, active = step_time(s, direction, n_steps, seq_len)
        src = ws_rows + (s % 2) * ws_stride_p
        dst = ws_rows + ((s + 1) % 2) * ws_stride_p
        for j0 in range(0, H, BLOCK_H):
            cols_j = j0 + offs_t
            mask_j = cols_j < H
            m = active[:, None] & mask_j[None, :]
            z = tl.load(x_rows + t * stride_xt + cols_j[None, :], mask=m, other=0.0).to(ACC_DTYPE)
            for k0 in range(0, H, BLOCK_H):
                cols_k = k0 + offs_t
                mask_k = cols_k < H
                h_k = tl.load(src + cols_k[None, :], mask=mask_b & mask_k[None, :], other=0.0)
                w_t = tl.load(w_base + cols_j[None, :] * H + cols_k[:, None],
                              mask=mask_k[:, None] & mask_j[None, :], other=0.0)
                z = tl.dot(h_k.to(w_t.dtype), w_t, acc=z, input_precision=INPUT_PRECISION,
                           out_dtype=ACC_DTYPE)
            h = activation(z, RELU)
            tl.store(o_rows + t * stride_ot + cols_j[None, :], h.to(out_ptr.dtype.element_ty), mask=m)
            # an inactive row carries its state over (a reverse row waiting for its last valid step)
            h_old = tl.load(src + cols_j[None, :], mask=mask_b & mask_j[None, :] & ~active[:, None], other=0.0)
            tl.store(dst + cols_j[None, :], tl.where(active[:, None], h, h_old), mask=mask_b & mask_j[None, :])
        tl.debug_barrier()

    final = ws_rows + (n_steps % 2) * ws_stride_p
    for j0 in range(0, H, BLOCK_H):
        cols = j0 + offs_t
        m = mask_b & (cols < H)[None, :]
        h = tl.load(final + cols[None, :], mask=m, other=0.0)
        tl.store(h_n_rows + cols[None, :], h.to(h_n_ptr.dtype.element_ty), mask=m)


def pad_square(w_hh: torch.Tensor, block_h: int) -> torch.Tensor:
    """`[D, H, H]` -> `[D, block_h, block_h]`, zero padded (the tensor itself when H == block_h)."""
    D, H, _ = w_hh.shape
    if H == block_h:
        return w_hh
    padded = w_hh.new_zeros((D, block_h, block_h))
    padded[:, :H, :H] = w_hh
    return padded


def device_guard(t: torch.Tensor):
    """`torch.cuda.device(t.device)` for a CUDA tensor (Triton launches on the current device and its
    current stream, not on the tensors' device), a no-op context otherwise."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_buffers(ok: bool, expected: str) -> None:
    """A launcher's precondition on the buffers it is handed (the layer op validates user input before
    this; a launcher never asserts): ValueError naming what was expected."""
    if not ok:
        raise ValueError(f"{expected} expected")


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def birnn_forward(
    x_proj: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    out: torch.Tensor,
    h_n: torch.Tensor,
    *,
    relu: bool,
    lengths: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: RecurrenceConfig | None = None,
) -> None:
    """Launch the forward recurrence (one launch for all directions). Shapes as in the module
    docstring; `out` and `h_n` are written in place. Every tensor's last dimension must be contiguous
    and `w_hh` fully contiguous. With `lengths` (`[B]` integers in [0, T] on the same device), row b
    runs its first lengths[b] steps, the reverse direction starting at lengths[b] - 1; only those
    steps of `out` are written (pass `out` zero-filled to get nn.RNN's zeros at padded steps)."""
    T, B, DH = x_proj.shape
    D, H = w_hh.shape[0], w_hh.shape[1]
    check_buffers(DH == D * H and out.shape == x_proj.shape and h0.shape == h_n.shape == (D, B, H)
                  and (lengths is None or (lengths.shape == (B,) and lengths.device == x_proj.device)),
                  "birnn_forward: shapes of x_proj/out [T, B, D*H], h0/h_n [D, B, H], lengths [B]")
    if T == 0 or B == 0:  # nothing to launch; an empty tensor's strides mean nothing (may be 0)
        h_n.copy_(h0)
        return
    check_buffers(w_hh.is_contiguous() and all(t.stride(-1) == 1 for t in (x_proj, out, h0, h_n)),
                  "birnn_forward: w_hh contiguous and every buffer's last dimension contiguous")
    cfg = config or select_config(H, B, x_proj.dtype, allow_tf32, device_limits(x_proj.device))
    grid = (cfg.num_batch_tiles(B), D)
    common = dict(
        HAS_LENGTHS=lengths is not None, RELU=relu, ACC_DTYPE=acc_dtype(x_proj.dtype),
        INPUT_PRECISION=input_precision(x_proj.dtype, allow_tf32),
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.warps(forward=True),
        **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages}),
    )
    strides = (x_proj.stride(0), x_proj.stride(1), out.stride(0), out.stride(1),
               h0.stride(0), h0.stride(1), h_n.stride(0), h_n.stride(1))
    with device_guard(x_proj):  # Triton launches on the current device: make it the tensors' device
        if cfg.w_on_chip:
            w_pad = pad_square(w_hh, cfg.block_h)
            birnn_fwd_onchip_kernel[grid](x_proj, w_pad, h0, out, h_n, lengths, T, B, H, *strides, **common)
        else:
            ws = torch.empty((2, D, B, H), device=x_proj.device, dtype=torch.float64
                             if x_proj.dtype == torch.float64 else torch.float32)
            birnn_fwd_streamed_kernel[grid](x_proj, w_hh, h0, out, h_n, lengths, ws, T, B, H, *strides, **common)
