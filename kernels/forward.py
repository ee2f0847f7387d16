"""Forward recurrence of a bidirectional Elman RNN layer: both directions in one launch, each
recurrence split across SPLIT cooperating programs.

Per layer the input projection of both directions is one GEMM done by the caller,
`x_proj = x @ [W_ih_fwd; W_ih_rev]^T + (b_ih + b_hh)`, laid out `[T, B, D*H]`. This kernel runs the
sequential part,

    h_t = act(x_proj[t, :, d*H:(d+1)*H] + h_{t-1} @ W_hh[d]^T)

for every direction `d` at once. Direction 0 walks t = 0 .. T-1 from `h0[0]`; direction 1 walks
t = T-1 .. 0 from `h0[1]`, writing its state of time t back at time t (the "flip back" costs nothing).
Both write into one `[T, B, D*H]` output, forward into `[..., :H]`, reverse into `[..., H:]`. A
unidirectional layer is the same launch with D = 1. With per-row lengths (PackedSequence) each row stops
at its own length and its reverse direction starts at its own last valid step (kernels/indexing.py); a
group runs only as many steps as its longest row.

The split (one skeleton for every SPLIT): a group is (direction, batch tile of BLOCK_B rows). Its H hidden
units are divided among SPLIT programs, program p owning units [p*U, p*U + U) (U = cdiv(H, SPLIT),
padded to BLOCK_N). Per step, program p

    1. takes the group's whole previous state h_{t-1} [BLOCK_B, H] (SPLIT = 1, persistent: its own
       registers; else: the exchange buffer `xch[s % 2]`, read with `exchange.load_exchanged`),
    2. multiplies it by its slice of W_hh^T: on chip (`W_ON_CHIP`, the slice [H, U] padded to
       [BLOCK_K, BLOCK_N] loaded once before the time loop), or streamed from L2 in BLOCK_K chunks,
    3. adds x_proj, applies the cell (`cell.cell_forward`), writes `out[t]` for its units,
    4. publishes its slice to `xch[(s + 1) % 2]` and meets the other SPLIT - 1 programs of its group at
       the barrier (`sync.group_barrier`, `BARRIER=True`), or the launch ends there (`BARRIER=False`,
       one launch per step: kernels/launch.py).

The ping-pong halves of `xch` make one barrier per step enough: step s + 1 writes the half that step s
did not read. SPLIT = 1 with `BARRIER=True` is the one-program-per-group on-chip kernel: no exchange, no
barrier. Groups never wait for each other. The fusion of the directions is legal because they share no
state: only the read-only input projection, and disjoint halves of the output.

Failure (only `BARRIER=True`, SPLIT > 1): a wait past `max_spins` polls aborts the group (kernels/sync.py):
every program of it then writes NaN to `out` for all its remaining steps and to `h_n`, and sets the error
flag `err`; kernels/launch.py raises the RuntimeError at the next recurrence launch on the device (no
host sync on the fast path) or at `check_errors()`.

Buffers (last dimension contiguous; other strides are arguments; index math in int64):
    x_proj  [T, B, D*H]       input projection with both biases folded in (input dtype)
    w       on chip: [D, SPLIT, BLOCK_N, BLOCK_K] zero-padded row slices of W_hh (`launch.slices`);
            streamed: W_hh [D, H, stride_w >= H] (rows padded to a multiple of 16 elements where H is
            not, `launch.row_padded`: aligned, vectorised chunk loads). W_hh[d][j, k] is unit j's weight
            on previous unit k.
    h0      [D, B, H]          initial states
    out     [T, B, D*H]        all states, written
    h_n     [D, B, H]          final state of each direction (direction 1's is its state at t = 0)
    lengths [B]                optional valid length of each row; None means T for all
    xch     [2, D, B, H]       exchange buffer (input dtype: the state is rounded to it for the dot
                               anyway); the launcher writes h0 into xch[0]
    sync    [D * n_tiles]      int32 barrier counters, zeroed by the launcher
    err     [1]                int32 error flag (kernels/launch.py)

Grid: (SPLIT, cdiv(B, BLOCK_B), D). Steps run are [s_begin, min(s_end, n_steps)): all of them in a
persistent launch, one per launch otherwise. T is a runtime argument (not specialised). Accumulation is
fp32 (fp64 for fp64 inputs); `tl.dot` takes the input dtype, TF32 for fp32 only when asked (cuDNN's
switch). Each program reduces over K in the same order whatever SPLIT is, so on the CPU the outputs are
bitwise equal for every SPLIT (tests/test_split.py).

Verified: parity with nn.RNN and float64 references under TRITON_INTERPRET=1 with SPLIT forced to 1, 2
and 3 (tests/test_split.py, tests/test_kernels.py, tests/test_parity.py, tests/test_packed.py); the
barrier protocol with programs running as threads (tests/test_split.py); compiled for sm_80/86/89/90
with shared memory, spill, tensor-core and release/acquire/L1-bypass checks (tests/test_compile.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .cell import cell_forward
from .config import RecurrenceConfig, device_limits, select_config
from .indexing import sequence_lengths, step_time
from .launch import device_guard  # noqa: F401  (re-exported: the launchers' device guard)
from .exchange import load_exchanged
from .sync import group_barrier


@triton.jit(do_not_specialize=["T", "s_begin", "s_end", "max_spins"])
def birnn_fwd_kernel(
    x_proj_ptr, w_ptr, out_ptr, h_n_ptr, lengths_ptr, xch_ptr, sync_ptr, err_ptr,
    T, B, H, U, stride_w, s_begin, s_end, max_spins,
    stride_xt, stride_xb,
    stride_ot, stride_ob,
    stride_hnd, stride_hnb,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    W_ON_CHIP: tl.constexpr, BARRIER: tl.constexpr,
):
    """One program: units [p*U, p*U + U) of BLOCK_B rows of one direction, for steps
    [s_begin, min(s_end, n_steps)). A row outside its valid steps keeps its state (that is its h_n) and
    stores nothing; padded units and rows are never stored."""
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
    KEEP: tl.constexpr = SPLIT == 1 and BARRIER and W_ON_CHIP  # whole state in this program's registers

    if W_ON_CHIP:  # W_hh[d][p*U + n, k] as w[k, n], the dot's right operand, for every step
        w_base = w_ptr + ((direction * SPLIT + p) * BLOCK_N).to(tl.int64) * BLOCK_K
        w = tl.load(w_base + offs_n[None, :] * BLOCK_K + offs_k[:, None])
    w_rows = w_ptr + (direction.to(tl.int64) * H + units[None, :]) * stride_w  # streamed: W_hh[d] rows

    half = D.to(tl.int64) * B * H  # one ping-pong half of xch
    xch_rows = xch_ptr + direction.to(tl.int64) * B * H + offs_b[:, None] * H
    bar = sync_ptr + direction * tl.num_programs(1) + pid_b
    col = direction * H + units  # this program's columns of the [.., D*H] buffers
    x_ptrs = x_proj_ptr + offs_b[:, None] * stride_xb + col[None, :]
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + col[None, :]

    # the state of the program's own units: the group's state before step s_begin (h0 at 0)
    s_stop = tl.minimum(s_end, n_steps)
    first = tl.minimum(s_begin, n_steps)
    h_own = load_exchanged(xch_rows + (first % 2) * half + units[None, :], mask_bn).to(ACC_DTYPE)
    aborted = (s_begin < 0).to(tl.int32)  # 0: a runtime int32 the barrier updates
    for s in range(s_begin, s_stop):
        t, active = step_time(s, direction, n_steps, seq_len)
        m = active[:, None] & mask_n[None, :]
        src = xch_rows + (s % 2) * half
        # x_proj is added after the dot, so its load is not the dot's accumulator and can be prefetched
        x = tl.load(x_ptrs + t * stride_xt, mask=m, other=0.0).to(ACC_DTYPE)
        if W_ON_CHIP:
            if KEEP:
                h_all = h_own
            else:
                h_all = load_exchanged(src + offs_k[None, :], mask_b[:, None] & (offs_k < H)[None, :])
            acc = tl.dot(h_all.to(w.dtype), w, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            # Triton's pipeliner would turn even volatile loads into L1-allocating cp.async.ca (seen in the
            # PTX), so split kernels compile with num_stages=1 and prefetch chunk k + 1 by hand
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
            h_next = load_exchanged(src + offs_k[None, :], mask_b[:, None] & (offs_k < H)[None, :])
            w_next = tl.load(w_rows + offs_k[:, None], mask=(offs_k < H)[:, None] & mask_n[None, :], other=0.0)
            for k0 in range(0, H, BLOCK_K):
                h_k, w_k = h_next, w_next
                ks = k0 + BLOCK_K + offs_k
                mask_k = ks < H
                h_next = load_exchanged(src + ks[None, :], mask_b[:, None] & mask_k[None, :])
                w_next = tl.load(w_rows + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(h_k.to(w_k.dtype), w_k, acc=acc, input_precision=INPUT_PRECISION,
                             out_dtype=ACC_DTYPE)
        h_new = cell_forward(acc + x, RELU)
        if HAS_LENGTHS:  # a row outside its valid steps keeps its state
            h_own = tl.where(active[:, None], h_new, h_own)
        else:
            h_own = h_new
        if SPLIT > 1 and BARRIER:
            h_own = tl.where(aborted != 0, float("nan"), h_own)
        tl.store(o_ptrs + t * stride_ot, h_own.to(out_ptr.dtype.element_ty), mask=m)
        if not KEEP:  # publish the slice for step s + 1 (or for the next launch)
            tl.store(xch_rows + ((s + 1) % 2) * half + units[None, :], h_own.to(xch_ptr.dtype.element_ty),
                     mask=mask_bn)
        if SPLIT > 1 and BARRIER:
            aborted = group_barrier(bar, (s - s_begin + 1) * SPLIT, max_spins, err_ptr, aborted)

    if (s_begin <= n_steps) & (s_end >= n_steps):  # this launch ran the group's last step
        if SPLIT > 1 and BARRIER:
            h_own = tl.where(aborted != 0, float("nan"), h_own)
        tl.store(h_n_ptr + direction * stride_hnd + offs_b[:, None] * stride_hnb + units[None, :],
                 h_own.to(h_n_ptr.dtype.element_ty), mask=mask_bn)




def check_buffers(ok: bool, expected: str) -> None:
    """A launcher's precondition on the buffers it is handed (the layer op validates user input before
    this; a launcher never asserts): ValueError naming what was expected."""
    if not ok:
        raise ValueError(f"{expected} expected")


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def common_kwargs(cfg: RecurrenceConfig, H: int, dtype: torch.dtype, allow_tf32: bool, relu: bool,
                  has_lengths: bool, forward: bool) -> dict:
    """The constexprs and launch options both kernels take."""
    kw = dict(HAS_LENGTHS=has_lengths, RELU=relu, ACC_DTYPE=acc_dtype(dtype),
              INPUT_PRECISION=input_precision(dtype, allow_tf32), BLOCK_B=cfg.block_b,
              BLOCK_N=cfg.block_h, BLOCK_K=cfg.k_block(H), SPLIT=cfg.programs_per_group(H),
              W_ON_CHIP=cfg.w_on_chip, num_warps=cfg.warps(forward=forward))
    if cfg.stages(H) is not None:
        kw["num_stages"] = cfg.stages(H)
    return kw


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
    """Launch the forward recurrence (all directions, SPLIT programs per group). Shapes as in the module
    docstring; `out` and `h_n` are written in place. Every tensor's last dimension must be contiguous
    and `w_hh` fully contiguous. With `lengths` (`[B]` integers in [0, T] on the same device), row b
    runs its first lengths[b] steps, the reverse direction starting at lengths[b] - 1; only those
    steps of `out` are written (pass `out` zero-filled to get nn.RNN's zeros at padded steps).
    Raises RuntimeError if an earlier persistent split launch on this device failed (kernels/launch.py)."""
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
    device = x_proj.device
    # the plan for the device, honouring FUSED_BIRNN_SPLIT (read now) where it can
    cfg = config or select_config(H, B, x_proj.dtype, allow_tf32, device_limits(device), launch.split_override())
    cfg.check(H)
    S, U, n_tiles = cfg.programs_per_group(H), cfg.units_per_program(H), cfg.num_batch_tiles(B)
    persistent = cfg.runs_persistent(H, T)
    common = common_kwargs(cfg, H, x_proj.dtype, allow_tf32, relu, lengths is not None, forward=True)
    with device_guard(x_proj):  # Triton launches on the current device: make it the tensors' device
        launch.raise_pending(device)
        w = launch.slices(w_hh, S, U, cfg.block_h, cfg.k_block(H)) if cfg.w_on_chip else launch.row_padded(w_hh)
        xch = x_proj.new_empty((2, D, B, H))
        xch[0].copy_(h0)
        sync = torch.zeros(D * n_tiles, dtype=torch.int32, device=device)
        err = launch.error_flag(device)
        args = (x_proj, w, out, h_n, lengths, xch, sync, err, T, B, H, U, w.stride(-2))
        after = (x_proj.stride(0), x_proj.stride(1), out.stride(0), out.stride(1), h_n.stride(0), h_n.stride(1))
        launch.run_steps(birnn_fwd_kernel,
                         (S, n_tiles, D), args, after, T, persistent, cfg.spin_limit(), common)
        if persistent and S > 1:
            launch.after_launch(device)
