"""Forward recurrence of one bidirectional RNN layer for every cell (Elman tanh/ReLU, LSTM with an
optional projection, GRU): both directions in one launch, each recurrence split across SPLIT cooperating
programs. One kernel skeleton (`birnn_fwd_kernel`); the cell is the constexpr CELL (0 Elman, 1 LSTM,
2 GRU) with GATES = G gate blocks per hidden unit (1, 4, 3) and its pointwise math in kernels/cell.py.

Per layer the input projection of all directions and gates is one GEMM done by the caller,
`x_proj = x @ [W_ih_0; W_ih_1]^T + biases`, laid out `[T, B, D*G*H]` (direction d, gate k, unit j at
column d*G*H + k*H + j; gate order nn's: i, f, g, o / r, z, n). This kernel runs the sequential part:

    Elman  h_t = act(x_t + h_{t-1} @ W_hh^T)
    LSTM   [i, f, g, o] = [sig, sig, tanh, sig](x_t + h_{t-1} @ W_hh^T);  c_t = f*c_{t-1} + i*g
           m_t = o * tanh(c_t);  h_t = m_t, or m_t @ W_hr^T with a projection (proj_size P)
    GRU    [r, z] = sig(x_{r,z} + h_{t-1} @ W_h{r,z}^T);  hn = h_{t-1} @ W_hn^T + b_hn
           n = tanh(x_n + r * hn);  h_t = n + z * (h_{t-1} - n)

for every direction d at once. Direction 0 walks t = 0 .. T-1 from h0[0]; direction 1 walks t = T-1 .. 0
from h0[1], writing its state of time t back at time t. Both write one `[T, B, D*P]` output (P = the
state width: proj_size for a projected LSTM, else H). With per-row lengths (PackedSequence) each row
stops at its own length and its reverse direction starts at its own last valid step (kernels/indexing.py);
a group runs only as many steps as its longest row.

The split (one skeleton for every SPLIT): a group is (direction, batch tile of BLOCK_B rows). Program p of
a group owns

* hidden units [p*U, p*U + U) (U = cdiv(H, SPLIT), padded to BLOCK_N): all G gates of them, their cell
  state c (LSTM: it never leaves the program's registers in the persistent kernel) and m = o*tanh(c);
* state units [p*UP, p*UP + UP) of h (padded to BLOCK_P): with a projection UP = cdiv(P, SPLIT), else
  the same units as above (UP = U).

Per step, program p

    1. takes the group's whole previous state h_{t-1} [BLOCK_B, P] (KEEP, one program whose products are
       one resident chunk each: its own registers; else the exchange buffer `xch[s % 2]`, read one chunk
       at a time with `exchange.load_exchanged`),
    2. multiplies it by its slice of W_hh^T in ONE gate product (kernels/product.py, `gather_product`):
       the G gates of its units side by side, gate-major, as the N = G*BLOCK_N columns of one dot per K
       chunk (the GRU's three gates padded to four blocks, the fourth zero: a power of two the warps can
       split; a second product for the n gate made its narrow dot repeat MMAs across warps), so the
       warps split the columns and no warp repeats another's MMAs; the accumulator is split into the
       gate tiles afterwards (`product.split_gates`). The slice is NK chunks of BLOCK_K rows (K = P padded
       to the chunk, not to a power of two): the first NR resident (loaded once before the time loop;
       Triton keeps them in shared memory), the rest streamed from L2 each step, chunk c + 1 in flight
       while chunk c multiplies. NR = NK: fully resident; 0 < NR < NK: partially (the slice does not fit
       the device's shared memory); NR = 0: streamed. One code path, one plan parameter;
    3. adds x_proj's gate columns, applies the cell (`cell.cell_forward`, `lstm_cell_forward`,
       `gru_cell_forward`) and writes `saved` (gated cells) for its units,
    4. with a projection (the projection mixes all hidden units): publishes m to `mxch`, meets the group
       (barrier 1), reads the whole m [BLOCK_B, H] and computes its state units of h = m @ W_hr^T (a
       gather product over K = H: NKH chunks of BLOCK_KH, NRH of them resident, counted after the gate
       product's). With KEEP m is already in the program's registers: a second dot, no exchange;
    5. writes `out[t]` for its state units, publishes them to `xch[(s + 1) % 2]` and meets the other
       SPLIT - 1 programs of its group at the barrier (`sync.group_barrier`, `BARRIER=True`), or the
       launch ends there (`BARRIER=False`, one launch per step, kernels/launch.py; with a projection one
       launch per phase: PHASE=1 runs 1-4 up to publishing m, PHASE=2 the projection and 5).

The ping-pong halves of `xch` make one barrier per exchange enough: step s + 1 writes the half that step s
did not read; `mxch` is written after the previous step's last barrier and read before the next.
KEEP (SPLIT = 1, `BARRIER=True`, one resident chunk per product) is the one-program-per-group kernel: no
exchange, no barrier (any other SPLIT = 1 program exchanges through global memory within itself:
`tl.debug_barrier` orders its threads). A persistent split launch is a cooperative launch on a GPU
(kernels/launch.py): every program of the grid resident at once, or the launch is refused and runs per
step. Groups never wait for each other. The fusion of the directions is legal because they share
no state: only the read-only input projection, and disjoint halves of every output.

In the launch-per-step mode a launch restarts from memory: h from `xch`, the LSTM's c from `saved` of
the previous step (c0 at step 0). So between launches c (and the GRU's h of the program's own units)
is carried in the input dtype, as torch_backend carries it, while the persistent kernel keeps them in
fp32: for fp32/fp64 every SPLIT is bitwise equal on the CPU, for fp16 within tolerance.

Failure (only `BARRIER=True`, SPLIT > 1): a wait past `max_spins` polls aborts the group (kernels/sync.py):
every program of it then writes NaN to `out` for all its remaining steps and to `h_n` / `c_n`, and sets
the error flag `err`; kernels/launch.py raises the RuntimeError at the next recurrence launch on the
device (no host sync on the fast path) or at `check_errors()`.

Buffers (last dimension contiguous; other strides are arguments; index math in int64; G, H, P as above):
    x_proj  [T, B, D*G*H]     input projection, foldable biases in (Elman/LSTM b_ih + b_hh; GRU b_ih +
                              [b_hr, b_hz, 0]); input dtype
    w       [D, SPLIT, NK, BLOCK_K, GP*BLOCK_N]  each program's slice of W_hh^T in K chunks
            (`launch.product_slices`): [d, p, c, k, g*BLOCK_N + n] = W_hh[d][g*H + p*U + n, c*BLOCK_K + k]
            (W_hh[d][g*H + j, q]: gate g of unit j on state unit q, nn's weight_hh layout), zero where that
            unit or column does not exist (GP = G, 4 for the GRU: its fourth block zero); resident and
            streamed chunks alike
    w_hr    LSTM with a projection: [D, SPLIT, NKH, BLOCK_KH, BLOCK_P], [d, p, c, k, q] =
            W_hr[d][p*UP + q, c*BLOCK_KH + k]
    b_hn    [D, H]            GRU: b_hn (zeros without biases)
    h0      [D, B, P]         initial states (copied into xch[0] by the launcher)
    c0, c_n [D, B, H]         LSTM: initial / final cell state (contiguous)
    out     [T, B, D*P]       all states, written at each row's valid steps only
    h_n     [D, B, P]         final state of each direction (direction 1's is its state at t = 0)
    saved   [T, D*B*S*H]      gated cells, torch_backend's layout (row s = processing step s: time s
                              for direction 0, T-1-s for direction 1): LSTM [T, D, B, 4, H] activated
                              gates i, f, g, o then [T, D, B, H] c_s (S = 5); GRU [T, D, B, 3, H] r, z,
                              W_hn h + b_hn then [T, D, B, H] n (S = 4). The LSTM's c part holds the kept
                              c at a row's inactive steps (also where the whole tile is past its end or
                              before its reverse start); gate parts there are unspecified.
    lengths [B]               optional valid length of each row; None means T for all
    xch     [2, D, B, P]      exchange buffer of h (input dtype: rounded to it for the dot anyway)
    mxch    [D, B, H]         exchange buffer of m (projection, unless one program on chip)
    sync    [D * n_tiles]     int32 barrier counters, zeroed by the launcher
    err     [1]               int32 error flag (kernels/launch.py)

Grid: (SPLIT, cdiv(B, BLOCK_B), D). Steps run are [s_begin, min(s_end, n_steps)): all of them in a
persistent launch, one per launch otherwise. T is a runtime argument (not specialised). Accumulation is
fp32 (fp64 for fp64 inputs); `tl.dot` takes the input dtype, TF32 for fp32 only when asked (cuDNN's
switch). Each program reduces over K in the same chunk order whatever SPLIT and residency are, so plans
with the same BLOCK_K give bitwise equal results on the CPU (fp32/fp64).

Launchers: `birnn_forward` (Elman into given buffers, the original signature) and `recurrence_forward`
(every cell, `fused_birnn.torch_backend.recurrence_forward`'s contract: same arguments and return tuple,
it allocates out/h_n/c_n/saved), both through `_forward`; plans from `config.select_config(H, B, dtype,
allow_tf32, limits, split, cell, proj_size)`, which the backward must be given the same way.

Verified: under TRITON_INTERPRET=1 (triton 3.9 with numpy 2.4, and triton 3.6 with numpy 2.4): Elman
parity with nn.RNN and float64 references with SPLIT forced to 1, 2 and 3 (tests/test_split.py,
tests/test_kernels.py, tests/test_parity.py, tests/test_packed.py); the gated cells against
fused_birnn.reference (float64) and torch_backend (out, h_n, c_n, saved) with SPLIT 1, 2, 3, lengths,
odd sizes, guard regions (tests/test_kernels_gated.py); every plan kind (one program in registers or
over chunks, split, partially resident, streamed), bitwise equal across plans with the same chunk, H =
7, 33, 50, 320, fp64/fp32/fp16, the modules with PackedSequence (tests/test_plan_kinds.py); the barrier
protocol with programs running as threads, the projection's two barriers included (tests/test_split.py,
tests/test_kernels_gated.py); a refused cooperative launch (tests/test_plans.py). Compiled for
sm_80/86/89/90 under triton 3.6 and 3.9 (tests/test_compile.py, `python -m fused_birnn.bench --suite rnn
lstm-gru --compile-only`): shared memory, no spill in the time loop, no load of a resident slice in the
time loop, tensor-core MMAs per step equal to the useful work, release/acquire and L1-bypassing
exchange loads. Not run on a GPU yet: no timing or GPU parity exists (tests/test_cuda_plans.py waits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .cell import cell_forward, gru_cell_forward, lstm_cell_forward
from .config import RecurrenceConfig, device_limits, gate_count, pass_shape, select_config
from .exchange import load_exchanged
from .indexing import sequence_lengths, step_time
from .launch import device_guard  # noqa: F401  (re-exported: the launchers' device guard)
from .product import gather_product, resident, split_gates
from .sync import group_barrier
from ..torch_backend import cell_mode, check_cell_arguments, saved_shape


@triton.jit(do_not_specialize=["T", "s_begin", "s_end", "max_spins"])
def birnn_fwd_kernel(
    x_proj_ptr, w_ptr, out_ptr, h_n_ptr, lengths_ptr, xch_ptr, sync_ptr, err_ptr,
    w_hr_ptr, b_hn_ptr, c0_ptr, c_n_ptr, saved_ptr, mxch_ptr,
    T, B, H, U, s_begin, s_end, max_spins,
    stride_xt, stride_xb,
    stride_ot, stride_ob,
    stride_hnd, stride_hnb,
    P, UP, stride_st,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, NR: tl.constexpr,
    SPLIT: tl.constexpr, BARRIER: tl.constexpr,
    CELL: tl.constexpr = 0, GATES: tl.constexpr = 1, PROJ: tl.constexpr = False, BLOCK_P: tl.constexpr = 16,
    BLOCK_KH: tl.constexpr = 16, NKH: tl.constexpr = 1, NRH: tl.constexpr = 1, PHASE: tl.constexpr = 0,
    KS: tl.constexpr = 1, KSH: tl.constexpr = 1,
):
    """One program: hidden units [p*U, p*U + U) (all G gates, and c for an LSTM) and state units
    [p*UP, p*UP + UP) (= the hidden units unless PROJ) of BLOCK_B rows of one direction, for steps
    [s_begin, min(s_end, n_steps)). A row outside its valid steps keeps its state (that is its h_n / c_n)
    and stores no output; padded units and rows are never stored. PHASE (launch per step with PROJ and
    SPLIT > 1 only): 1 runs a step up to publishing m, 2 the projection after it; 0 the whole step."""
    p = tl.program_id(0)
    pid_b = tl.program_id(1)
    direction = tl.program_id(2)
    D = tl.num_programs(2)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    units = p * U + offs_n  # hidden units: gates, c, m
    mask_n = (offs_n < U) & (units < H)
    mask_b = offs_b < B
    mask_bn = mask_b[:, None] & mask_n[None, :]
    if PROJ:  # state units: h (P of them)
        offs_q = tl.arange(0, BLOCK_P)
        sunits = p * UP + offs_q
        mask_s = (offs_q < UP) & (sunits < P)
        mask_bs = mask_b[:, None] & mask_s[None, :]
    else:  # the hidden units themselves (the same registers: P == H, UP == U)
        sunits = units
        mask_s = mask_n
        mask_bs = mask_bn
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)
    n_steps = tl.max(seq_len, axis=0)
    # the whole state in this program's registers: one program whose every product is one resident chunk
    KEEP: tl.constexpr = (SPLIT == 1 and BARRIER and NK == 1 and NR == 1
                          and BLOCK_K == (BLOCK_P if PROJ else BLOCK_N)
                          and (not PROJ or (NKH == 1 and NRH == 1 and BLOCK_KH == BLOCK_N)))
    NB: tl.constexpr = 2 if PROJ else 1  # barriers per step (SPLIT > 1, persistent): m, then h
    # the gate product: the gates side by side in one dot (gate-major columns k*BLOCK_N + n), the GRU's
    # three padded to four blocks (the fourth zero): GP blocks, a power of two the warps can split
    GP: tl.constexpr = 4 if CELL == 2 else GATES
    GN: tl.constexpr = GP * BLOCK_N  # a chunk row of the slice
    w_prog = w_ptr + ((direction * SPLIT + p) * NK * BLOCK_K).to(tl.int64) * GN
    ws = resident(w_prog, NR, BLOCK_K, GN, GN, 0, KS)
    if PROJ:  # W_hr[d][p*UP + q, :] as chunks of wr[:, q]: the projection's right operand
        wr_prog = w_hr_ptr + ((direction * SPLIT + p) * NKH * BLOCK_KH).to(tl.int64) * BLOCK_P
        wrs = resident(wr_prog, NRH, BLOCK_KH, BLOCK_P, BLOCK_P, 0, KSH)

    half = D.to(tl.int64) * B * P  # one ping-pong half of xch
    xch_rows = xch_ptr + direction.to(tl.int64) * B * P + offs_b[:, None] * P
    bar = sync_ptr + direction * tl.num_programs(1) + pid_b
    col = direction * GATES * H + units  # this program's gate-0 columns of x_proj; gate k at + k*H
    x_ptrs = x_proj_ptr + offs_b[:, None] * stride_xb + col[None, :]
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + (direction * P + sunits)[None, :]
    state_rows = direction.to(tl.int64) * B * H + offs_b[:, None] * H + units[None, :]  # [D, B, H] buffers
    row_shift = direction * (T - n_steps)  # saved row of step s: s + row_shift (torch_backend's order)
    if CELL != 0:  # saved [T, D, B, G, H] gates, then [T, D, B, H] c (LSTM) / n (GRU); row stride stride_st
        sv_gates = saved_ptr + (direction * B + offs_b[:, None]) * GATES * H + units[None, :]
        sv_state = saved_ptr + D.to(tl.int64) * B * GATES * H + state_rows

    # the group's state before step s_begin (h0, c0 at 0): h of the state units from the exchange buffer,
    # c (LSTM) from c0 or the saved c of the step before (a launch per step)
    s_stop = tl.minimum(s_end, n_steps)
    first = tl.minimum(s_begin, n_steps)
    h_own = load_exchanged(xch_rows + (first % 2) * half + sunits[None, :], mask_bs).to(ACC_DTYPE)
    if CELL == 1:
        c_init = tl.load(c0_ptr + state_rows, mask=mask_bn, other=0.0).to(ACC_DTYPE)
        prev_row = tl.maximum(first - 1 + row_shift, 0)
        c_prev = tl.load(sv_state + prev_row * stride_st, mask=mask_bn, other=0.0).to(ACC_DTYPE)  # unused at 0
        c_own = tl.where(first > 0, c_prev, c_init)
    if CELL == 2:
        b_hn = tl.load(b_hn_ptr + direction * H + units, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    aborted = (s_begin < 0).to(tl.int32)  # 0: a runtime int32 the barrier updates
    # a while loop, not range(): Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4
    # (NOTES-triton 8d); it compiles to the same loop
    s = s_begin
    while s < s_stop:
        t, active = step_time(s, direction, n_steps, seq_len)
        m = active[:, None] & mask_n[None, :]
        row = s + row_shift
        if PHASE != 2:
            # x_proj is added after the product, so its loads are not the dots' accumulators and can be prefetched
            x0 = tl.load(x_ptrs + t * stride_xt, mask=m, other=0.0).to(ACC_DTYPE)
            if GATES > 1:
                x1 = tl.load(x_ptrs + t * stride_xt + H, mask=m, other=0.0).to(ACC_DTYPE)
                x2 = tl.load(x_ptrs + t * stride_xt + 2 * H, mask=m, other=0.0).to(ACC_DTYPE)
            if GATES > 3:
                x3 = tl.load(x_ptrs + t * stride_xt + 3 * H, mask=m, other=0.0).to(ACC_DTYPE)
            acc = tl.zeros((BLOCK_B, GN), dtype=ACC_DTYPE)
            if KEEP:
                acc = tl.dot(h_own.to(ws[0].dtype), ws[0], acc=acc, input_precision=INPUT_PRECISION,
                             out_dtype=ACC_DTYPE)
            else:
                acc = gather_product(xch_rows + (s % 2) * half, mask_b, P, w_prog, ws, acc, NK, NK, NR, BLOCK_K,
                                     GN, ACC_DTYPE, INPUT_PRECISION, KS)
            z0, z1, z2, z3 = split_gates(acc, GP, BLOCK_B, BLOCK_N)  # GRU: r, z, W_hn h, the padding
            if CELL == 0:
                h_new = cell_forward(z0 + x0, RELU)
            elif CELL == 1:
                g_i, g_f, g_g, g_o, c_new, h_new = lstm_cell_forward(z0 + x0, z1 + x1, z2 + x2, z3 + x3, c_own)
                if HAS_LENGTHS:  # a row outside its valid steps keeps its cell state
                    c_own = tl.where(active[:, None], c_new, c_own)
                else:
                    c_own = c_new
                if SPLIT > 1 and BARRIER:
                    c_own = tl.where(aborted != 0, float("nan"), c_own)
                sv = sv_gates + row * stride_st
                dt = saved_ptr.dtype.element_ty
                tl.store(sv, g_i.to(dt), mask=mask_bn)
                tl.store(sv + H, g_f.to(dt), mask=mask_bn)
                tl.store(sv + 2 * H, g_g.to(dt), mask=mask_bn)
                tl.store(sv + 3 * H, g_o.to(dt), mask=mask_bn)
                tl.store(sv_state + row * stride_st, c_own.to(dt), mask=mask_bn)  # kept c where inactive
            else:
                hn = z2 + b_hn
                g_r, g_z, g_n, h_new = gru_cell_forward(z0 + x0, z1 + x1, hn, x2, h_own)
                sv = sv_gates + row * stride_st
                dt = saved_ptr.dtype.element_ty
                tl.store(sv, g_r.to(dt), mask=mask_bn)
                tl.store(sv + H, g_z.to(dt), mask=mask_bn)
                tl.store(sv + 2 * H, hn.to(dt), mask=mask_bn)
                tl.store(sv_state + row * stride_st, g_n.to(dt), mask=mask_bn)
        if PROJ:  # h = m @ W_hr^T mixes all hidden units: this program computes its state units of h
            acc_h = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC_DTYPE)
            if KEEP:  # one program: m of every hidden unit is in its registers
                h_new = tl.dot(h_new.to(wrs[0].dtype), wrs[0], acc=acc_h, input_precision=INPUT_PRECISION,
                               out_dtype=ACC_DTYPE)
            else:
                m_rows = mxch_ptr + direction.to(tl.int64) * B * H + offs_b[:, None] * H
                if PHASE != 2:  # publish m; the group meets (or the launch ends) before anyone reads it
                    tl.store(m_rows + units[None, :], h_new.to(mxch_ptr.dtype.element_ty), mask=mask_bn)
                    if SPLIT > 1 and BARRIER:
                        aborted = group_barrier(bar, ((s - s_begin) * NB + 1) * SPLIT, max_spins, err_ptr, aborted)
                    elif SPLIT == 1:
                        tl.debug_barrier()  # other threads of this program read what this one wrote
                if PHASE != 1:
                    h_new = gather_product(m_rows, mask_b, H, wr_prog, wrs, acc_h, NKH, NKH, NRH, BLOCK_KH,
                                           BLOCK_P, ACC_DTYPE, INPUT_PRECISION, KSH)
        if PHASE != 1:
            if HAS_LENGTHS:  # a row outside its valid steps keeps its state
                h_own = tl.where(active[:, None], h_new, h_own)
            else:
                h_own = h_new
            if SPLIT > 1 and BARRIER:
                h_own = tl.where(aborted != 0, float("nan"), h_own)
            tl.store(o_ptrs + t * stride_ot, h_own.to(out_ptr.dtype.element_ty),
                     mask=active[:, None] & mask_s[None, :])
            if not KEEP:  # publish the slice for step s + 1 (or for the next launch)
                tl.store(xch_rows + ((s + 1) % 2) * half + sunits[None, :], h_own.to(xch_ptr.dtype.element_ty),
                         mask=mask_bs)
                if SPLIT > 1 and BARRIER:
                    aborted = group_barrier(bar, ((s - s_begin) * NB + NB) * SPLIT, max_spins, err_ptr, aborted)
                elif SPLIT == 1:
                    tl.debug_barrier()  # other threads of this program read it at the next step
        s += 1

    if (s_begin <= n_steps) & (s_end >= n_steps):  # this launch ran the group's last step
        if PHASE != 1:
            if SPLIT > 1 and BARRIER:
                h_own = tl.where(aborted != 0, float("nan"), h_own)
            tl.store(h_n_ptr + direction * stride_hnd + offs_b[:, None] * stride_hnb + sunits[None, :],
                     h_own.to(h_n_ptr.dtype.element_ty), mask=mask_bs)
        if CELL == 1 and PHASE != 2:
            if SPLIT > 1 and BARRIER:
                c_own = tl.where(aborted != 0, float("nan"), c_own)
            tl.store(c_n_ptr + state_rows, c_own.to(c_n_ptr.dtype.element_ty), mask=mask_bn)
            # saved c of the steps where the whole tile is inactive, as torch_backend keeps it: after the
            # longest row (direction 0: the final c) or before it (direction 1: c0)
            c_first = tl.load(c0_ptr + state_rows, mask=mask_bn, other=0.0).to(ACC_DTYPE)  # (not kept live)
            c_fill = tl.where(direction == 0, c_own, c_first).to(saved_ptr.dtype.element_ty)
            r = n_steps * 0
            while r < T - n_steps:
                tl.store(sv_state + (r + (1 - direction) * n_steps) * stride_st, c_fill, mask=mask_bn)
                r += 1


def check_buffers(ok: bool, expected: str) -> None:
    """A launcher's precondition on the buffers it is handed (the layer op validates user input before
    this; a launcher never asserts): ValueError naming what was expected."""
    if not ok:
        raise ValueError(f"{expected} expected")


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def kernel_constants(cfg: RecurrenceConfig, hidden_size: int, state_size: int, cell: str, proj: bool) -> dict:
    """The plan's shape constexprs of `birnn_fwd_kernel` (also for the compile checks), from
    `config.pass_shape`: BLOCK_N, BLOCK_P (a program's hidden and state units, padded), BLOCK_K / NK / NR
    (the gate product's K chunk over P = `state_size`, its chunk count and how many stay resident),
    BLOCK_KH / NKH / NRH (the projection's, K = H), SPLIT, CELL, GATES, PROJ, KS / KSH (the warps that
    split the gate product's / the projection's K, 1: none)."""
    shape = pass_shape(cfg, hidden_size, state_size, gate_count(cell), proj, forward=True)
    return dict(BLOCK_N=cfg.block_h, BLOCK_P=shape["block_p"], BLOCK_K=shape["block_k"], NK=shape["chunks"],
                NR=shape["resident"], BLOCK_KH=shape["block_k2"], NKH=shape["chunks2"], NRH=shape["resident2"],
                SPLIT=cfg.programs_per_group(hidden_size), CELL=CELL_CODES[cell], GATES=gate_count(cell),
                PROJ=proj, KS=shape["ks"], KSH=shape["ks2"] if proj else 1)


def common_kwargs(cfg: RecurrenceConfig, H: int, dtype: torch.dtype, allow_tf32: bool, relu: bool,
                  has_lengths: bool, forward: bool, cell: str | None = None, proj_size: int = 0) -> dict:
    """The constexprs and launch options of a forward launch with plan `cfg` (`cell`: nn.RNNBase's mode
    name; None: the Elman cell `relu` names): `kernel_constants` plus the dtype's, HAS_LENGTHS and RELU,
    and num_warps / num_stages."""
    mode = cell or ("RNN_RELU" if relu else "RNN_TANH")
    kw = dict(HAS_LENGTHS=has_lengths, RELU=relu, ACC_DTYPE=acc_dtype(dtype),
              INPUT_PRECISION=input_precision(dtype, allow_tf32), BLOCK_B=cfg.block_b,
              num_warps=cfg.warps(forward=forward),
              **kernel_constants(cfg, H, proj_size or H, mode, bool(proj_size)))
    if cfg.stages(H) is not None:
        kw["num_stages"] = cfg.stages(H)
    if cfg.max_registers is not None:
        kw["maxnreg"] = cfg.max_registers
    return kw


CELL_CODES = {"RNN_TANH": 0, "RNN_RELU": 0, "LSTM": 1, "GRU": 2}  # the kernels' CELL constexpr


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
    """Launch the Elman forward recurrence (all directions, SPLIT programs per group). Shapes as in the
    module docstring; `out` and `h_n` are written in place. Every tensor's last dimension must be
    contiguous and `w_hh` fully contiguous. With `lengths` (`[B]` integers in [0, T] on the same device),
    row b runs its first lengths[b] steps, the reverse direction starting at lengths[b] - 1; only those
    steps of `out` are written (pass `out` zero-filled to get nn.RNN's zeros at padded steps).
    Raises RuntimeError if an earlier persistent split launch on this device failed (kernels/launch.py)."""
    T, B, DH = x_proj.shape
    D, H = w_hh.shape[0], w_hh.shape[1]
    check_buffers(DH == D * H and out.shape == x_proj.shape and h0.shape == h_n.shape == (D, B, H)
                  and (lengths is None or (lengths.shape == (B,) and lengths.device == x_proj.device)),
                  "birnn_forward: shapes of x_proj/out [T, B, D*H], h0/h_n [D, B, H], lengths [B]")
    _forward(x_proj, w_hh, h0, out, h_n, "RNN_RELU" if relu else "RNN_TANH", lengths=lengths,
             allow_tf32=allow_tf32, config=config)


def _forward(x_proj, w_hh, h0, out, h_n, mode, *, c0=None, c_n=None, w_hr=None, b_hn=None, saved=None,
             lengths=None, allow_tf32=False, config=None) -> None:
    """Launch the forward recurrence of any cell into the given buffers (shapes checked by the callers)."""
    T, B, _ = x_proj.shape
    G = gate_count(mode)
    D, GH, P = w_hh.shape
    H = GH // G
    proj = 0 if w_hr is None else P
    if T == 0 or B == 0:  # nothing to launch; an empty tensor's strides mean nothing (may be 0)
        h_n.copy_(h0)
        if c_n is not None:
            c_n.copy_(c0)
        return
    check_buffers(w_hh.is_contiguous() and all(t.stride(-1) == 1 for t in (x_proj, out, h0, h_n))
                  and (saved is None or saved.stride(-1) == 1) and (c_n is None or c_n.is_contiguous())
                  and (w_hr is None or w_hr.is_contiguous()) and (b_hn is None or b_hn.is_contiguous()),
                  "birnn_forward: w_hh, w_hr, b_hn, c_n contiguous and every buffer's last dimension contiguous")
    device = x_proj.device
    # the plan for the device, honouring FUSED_BIRNN_SPLIT (read now) where it can; positional arguments
    # (tests replace select_config by a lambda taking *args)
    plan = (H, B, x_proj.dtype, allow_tf32, device_limits(device), launch.split_override())
    cfg = config or (select_config(*plan) if G == 1 else select_config(*plan, mode, proj or None))
    cfg.check(H)
    S, U, n_tiles = cfg.programs_per_group(H), cfg.units_per_program(H), cfg.num_batch_tiles(B)
    UP = cfg.proj_units_per_program(H, proj) if proj else U
    persistent = cfg.runs_persistent(H, T)
    common = common_kwargs(cfg, H, x_proj.dtype, allow_tf32, mode == "RNN_RELU", lengths is not None,
                           forward=True, cell=mode, proj_size=proj)
    keep = pass_shape(cfg, H, P, G, bool(proj), True, persistent)["keep"]  # the state in registers: no mxch
    with device_guard(x_proj):  # Triton launches on the current device: make it the tensors' device
        launch.raise_pending(device)
        if G == 3:  # the GRU's gate blocks padded to four (the fourth zero): one power-of-two product
            w_hh = torch.cat([w_hh, w_hh.new_zeros((D, H, P))], 1)
        w = launch.product_slices(w_hh, 4 if G == 3 else G, S, U, cfg.block_h, common["BLOCK_K"], common["NK"])
        wr = None if w_hr is None else launch.product_slices(w_hr, 1, S, UP, common["BLOCK_P"], common["BLOCK_KH"],
                                                             common["NKH"])
        xch = x_proj.new_empty((2, D, B, P))
        xch[0].copy_(h0)
        mxch = x_proj.new_empty((D, B, H)) if proj and not keep else None
        if c0 is not None:
            c0 = c0.contiguous()
        sync = torch.zeros(D * n_tiles, dtype=torch.int32, device=device)
        err = launch.error_flag(device)
        args = (x_proj, w, out, h_n, lengths, xch, sync, err, wr, b_hn, c0, c_n, saved, mxch, T, B, H, U)
        after = (x_proj.stride(0), x_proj.stride(1), out.stride(0), out.stride(1), h_n.stride(0), h_n.stride(1),
                 P, UP, 0 if saved is None else saved.stride(0))
        phases = (1, 2) if proj and S > 1 else ()  # launch per step: m, then h, each ends at a launch boundary
        launch.run_steps(birnn_fwd_kernel, (S, n_tiles, D), args, after, T, persistent, cfg.spin_limit(),
                         common, phases, cooperative=launch.cooperative(cfg, S, device),
                         what=f"the forward of a {mode} layer (H={H}, B={B}, T={T}, S={S}) on {device}")
        if persistent and S > 1:
            launch.after_launch(device)


def recurrence_forward(
    x_proj: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None = None,
    w_hr: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    *,
    relu: bool = False,
    cell: str | None = None,
    lengths: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: RecurrenceConfig | None = None,
) -> tuple[torch.Tensor, ...]:
    """The recurrence of one layer, all directions, for any cell, on the kernels: the contract of
    `fused_birnn.torch_backend.recurrence_forward` (same arguments, buffers, `saved` layout and return
    tuple), so a caller picks either per call.

    Args:
        x_proj: `[T, B, D*G*H]` input projection, foldable biases included (GRU: b_hn apart).
        w_hh: `[D, G*H, P]`.
        h0: `[D, B, P]`.
        c0: `[D, B, H]`, LSTM only (required there).
        w_hr: `[D, P, H]`, LSTM with a projection only.
        b_hn: `[D, H]`, GRU with biases only.
        relu, cell: the cell (as torch_backend: None is the Elman cell `relu` names).
        lengths: optional `[B]` valid lengths (on x_proj's device, values in [1, T]).
        allow_tf32: fp32 dots on TF32 tensor cores (cuDNN's switch).
        config: a plan to use instead of `select_config`'s.

    Returns:
        Elman `(out, h_n)`; LSTM `(out, h_n, c_n, saved)`; GRU `(out, h_n, saved)`: `out [T, B, D*P]`
        (0 at padded steps), `h_n [D, B, P]`, `c_n [D, B, H]`, `saved [T, D*B*S*H]` (S = 5 LSTM, 4 GRU).
    """
    mode = cell_mode(cell, relu)
    check_cell_arguments(mode, c0=c0, w_hr=w_hr, b_hn=b_hn)
    T, B, _ = x_proj.shape
    D, GH, P = w_hh.shape
    G = gate_count(mode)
    H = GH // G
    check_buffers(x_proj.shape[2] == D * GH and GH == G * H and h0.shape == (D, B, P)
                  and (c0 is None or c0.shape == (D, B, H)) and (b_hn is None or b_hn.shape == (D, H))
                  and (w_hr is None or w_hr.shape == (D, P, H)) and (w_hr is not None or P == H)
                  and (lengths is None or (lengths.shape == (B,) and lengths.device == x_proj.device)),
                  "recurrence_forward: x_proj [T, B, D*G*H], w_hh [D, G*H, P], h0 [D, B, P], c0 [D, B, H], "
                  "w_hr [D, P, H] (P = H without it), b_hn [D, H], lengths [B]")
    x_proj = x_proj if x_proj.stride(-1) == 1 else x_proj.contiguous()
    h0 = h0 if h0.stride(-1) == 1 else h0.contiguous()
    w_hh = w_hh.contiguous()
    out = x_proj.new_empty((T, B, D * P)) if lengths is None else x_proj.new_zeros((T, B, D * P))
    h_n = x_proj.new_empty((D, B, P))
    c_n = saved = None
    if mode == "LSTM":
        c_n = x_proj.new_empty((D, B, H))
    shape = saved_shape(mode, T, B, D, H)
    if shape is not None:
        saved = x_proj.new_empty(shape)
    if mode == "GRU" and b_hn is None:
        b_hn = x_proj.new_zeros((D, H))
    _forward(x_proj, w_hh, h0, out, h_n, mode, c0=c0, c_n=c_n,
             w_hr=None if w_hr is None else w_hr.contiguous(),
             b_hn=None if b_hn is None else b_hn.contiguous(), saved=saved, lengths=lengths,
             allow_tf32=allow_tf32, config=config)
    if mode == "LSTM":
        return out, h_n, c_n, saved
    if mode == "GRU":
        return out, h_n, saved
    return out, h_n
