"""Backward recurrence (BPTT) of one bidirectional layer of any cell (Elman, LSTM with optional
projection, GRU): both directions in one launch, each recurrence split across SPLIT cooperating programs,
the cell's pointwise math in kernels/cell.py. The contract (arguments, `saved` layout, results) is
`fused_birnn.torch_backend.recurrence_backward`'s; `recurrence_backward` below is its launcher.

Per direction, walking the direction's processing order backwards, with g_s the gradient reaching the
state h_s (P wide: `proj_size` for a projected LSTM, else H) and G gates per hidden unit (1, 4, 3):

    g_s   = grad_out[t] + dh                      dh: from step s + 1 (grad_h_n at the last step)
    Elman dz_s = g_s * act'(h_s)                  (`cell_backward`; act' from the stored output)
    LSTM  dm = g_s (or g_s @ W_hr),  dc = dc * f_{s+1} + dm * o (1 - tanh(c)^2),
          dz_s = [dc g i(1-i), dc c_{s-1} f(1-f), dc i (1-g^2), dm tanh(c) o(1-o)]   (`lstm_cell_backward`)
    GRU   dn = g (1-z)(1-n^2),  dz_s = [dn hn r(1-r), g (h_{s-1} - n) z(1-z), dn r]  (`gru_cell_backward`;
          the input side's n block is dn, the hidden side's dn * r), carry g * z
    dh    = dz_s @ W_hh (+ GRU's carry g * z)      gradient into h_{s-1}; after the last step grad_h0

`saved` (torch_backend's layout, row s = processing step s, i.e. time s forward and T-1-s reverse):
LSTM `[T, D, B, 4, H]` activated i, f, g, o then `[T, D, B, H]` c_s; GRU `[T, D, B, 3, H]` r, z,
`W_hn h + b_hn` then `[T, D, B, H]` n. c_{s-1} is the previous row's c (c0 at the row's first step), the
GRU's h_{s-1} comes from `out` (h0 at the row's first step): a row's first step is found from its own
length, so nothing is read from inactive rows, whose gates are garbage (never multiplied into a result:
`where`). With lengths a row keeps `dh = grad_h_n` (and `dc = grad_c_n`) until the walk reaches its
last valid step, mirroring the forward's activity mask; padded steps of `grad_pre` stay 0.

The split mirrors kernels/forward.py. Program p of a group owns hidden units [p*U, p*U + U) (all G gates
and, LSTM, c: dc stays in its registers) and state units [p*UP, p*UP + UP) (h, dh; without a projection
the hidden units themselves, in the same index and mask registers: separate ones pushed Elman kernels
past ptxas' register budget, stack spills at sm_80-90). Per step it computes dz for its units' G gates
and writes `grad_pre[t]` (GRU also `grad_hn[t]`); what the group then exchanges is the plan's choice
(`EXCHANGE_DH`, `config.RecurrenceConfig.exchange`):

* "dz": each program publishes its dz (G*U values a row) to `xch[r % 2]`, meets the group at the
  barrier (or the launch ends), reads the group's whole dz back and multiplies it by its columns of
  W_hh, `dh[:, own] = dz_all @ W_hh[:, p*UP:(p+1)*UP]` (a gather product, kernels/product.py: K = G*H in
  chunks within each gate, resident or streamed as in the forward);
* "dh": each program multiplies its own dz by its own rows of W_hh, `partial_p = sum_g dz_g @
  W_hh[g*H + own units, :]` (G dots of K = U per column chunk of P, `product.scatter_product`: the rows
  it holds are the forward's slice, transposed), publishes the partial sums of dh for every state unit,
  meets the group, and adds up the group's partial sums of its own state units, programs q = 0 .. SPLIT-1
  in order (`REDUCE` of them per load).

Why both (bytes a step and a program, B_b rows, input dtype e bytes; the forward reads its group's state,
B_b * P * e): "dz" reads the group's dz, B_b * G*H * e, and writes B_b * G*U * e; "dh" writes B_b * P * e
and reads SPLIT * B_b * UP * e = B_b * P * e. So "dh" moves 2 P e a row against "dz"'s G H e: for the
LSTM (G = 4) and the GRU (G = 3) half and two thirds, for the Elman cell (G = 1) twice as much, and
summed over the chip the same ratios (SPLIT programs each). The partial sums are rounded to the input
dtype once each (an error like one rounding of dh, as the dz exchange's rounding of dz); their sum's
order depends on SPLIT, so "dh" results are bitwise repeatable but not bitwise equal across SPLIT (the
"dz" exchange's are, for plans with the same chunk). The planner (kernels/config.py) picks the exchange
by the cost model's estimate, which follows these bytes: "dh" for the gated cells at large H (deepspeech's
LSTM, H = 1024, B = 32, fp16 on an H100, estimates: a backward step 4.6 us with "dh" against 3.4 forward;
with "dz", 256 KiB read a program and step, 7.7 us, 2.2x), "dz" for Elman.

With a projection g reaches m = o * tanh(c) through W_hr, which mixes every state unit into every hidden
unit: a split step publishes g_s (`xg`), meets at a second barrier, and computes `dm = g_all @ W_hr[:,
units]` (a gather product over K = P; two phases a step; the launch-per-step mode runs 2 n_steps + 1
launches). g_s is also written per step (`g`, processing order, P values a row: the cheapest way to the
weight gradient) and the launcher forms `grad_w_hr = sum_s g_s^T m_s` as one GEMM after the loop, m
recomputed from `saved` off the loop (0 at inactive steps). KEEP (one program, persistent, the "dh" form
with every product one resident chunk) keeps dz, dh (and g) in registers: `dh = sum_g dz_g @ W_g`, no
exchange, one phase a step. Errors as in kernels/forward.py: `grad_pre`, `grad_h0`, `grad_c0` are NaN
from the failed step on and the error flag is set.

Every other gradient is matrix products the caller does on `grad_pre` / `grad_hn` (dW_ih, dW_hh, biases,
grad_input). No float atomics anywhere: every sum is in a fixed order, so the result is bitwise
deterministic for a given plan; with the "dz" exchange each program reduces over K in the same chunk
order whatever SPLIT is, so on the CPU plans with the same chunk give bitwise equal results.

Buffers (last dimension contiguous; index math in int64; internal buffers contiguous):
    out       [T, B, D*P]  forward states h_t (read; the GRU's h_{s-1})
    grad_out  [T, B, D*P]  gradient of the layer output (read)
    w         "dz": [D, SPLIT, NK, BLOCK_K, BLOCK_P], [d, p, c, k, q] = W_hh[d][g*H + j, p*UP + q] for chunk c
              = g*(NK/G) + i, j = i*BLOCK_K + k (chunks within each gate, `launch.product_slices`); "dh":
              [D, SPLIT, NK, G, BLOCK_N, BLOCK_K], [d, p, c, g, n, j] = W_hh[d][g*H + p*U + n, c*BLOCK_K + j]
              (`launch.row_slices`); zero where the row or column does not exist
    w_hr      LSTM projection: [D, SPLIT, NKP, BLOCK_KP, BLOCK_N], [d, p, c, k, n] =
              W_hr[d][c*BLOCK_KP + k, p*U + n]
    saved     [T, D*B*(G+1)*H]  the forward's activations (above), row stride stride_st
    h0        [D, B, H]    GRU initial state (its first step's h_{s-1});  c0 [D, B, H] LSTM
    grad_pre  [T, B, D*G*H] input-side gradient of the gates' pre-activations (written)
    grad_h0   [D, B, P]    gradient of the initial state (written); grad_c0 [D, B, H] LSTM (written)
    grad_hn   [T, B, D*H]  GRU: gradient of W_hn h + b_hn, the hidden side's n block (written)
    g         [T, D, B, P] LSTM projection: g_s per step, processing order (written; zero-filled)
    lengths   [B]          optional valid lengths, as in forward.py
    dh        [D, B, P]    running dh (fp32; fp64 for fp64): the launcher writes grad_h_n into it, each
                           launch reads its programs' units at its start and writes them at its end
    aux       [D, B, H]    same dtype, the per-unit carry across launches: LSTM dc (from grad_c_n), GRU g*z
    xch       "dz": [2, D, B, G*H] the group's dz; "dh": [2, D, SPLIT, B, P] each program's partial sums of
              dh (input dtype: rounded to it for the dot, or once each)
    xg        [D, B, P]    exchange buffer of g (projection, split)
    sync, err              as in forward.py

Grid: (SPLIT, cdiv(B, BLOCK_B), D); a launch runs iterations [r_begin, min(r_end, PHASES * n_steps + 1)),
iteration r finishing step r - 1 (dh from the exchange) and starting step r (dz, its exchange
published): the exchange sits inside the iteration, so the launch-per-step mode needs PHASES * n_steps + 1
launches. A persistent split launch is a cooperative launch on a GPU (kernels/launch.py).

Verified (CPU, TRITON_INTERPRET=1, triton 3.9 and 3.6 with numpy 2.4): against
`torch_backend.recurrence_backward` and float64 autograd of `torch_backend.differentiable_layer` for LSTM
(with and without proj_size), GRU and Elman, with lengths, S forced to 1/2/3 (bitwise equal with "dz"),
both exchanges, resident, partially resident and streamed, a K split among warps, fp64/fp32/fp16, odd
sizes, NaN guard regions (tests/test_kernels_gated_backward.py, tests/test_plan_kinds.py; Elman also
tests/test_kernels.py, tests/test_split.py, `gradcheck` in tests/test_gradients.py). Compiled for
sm_80/86/89/90 under triton 3.6 and 3.9 with the forward's checks (tests/test_compile.py). Not run on a
GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .cell import cell_backward, gru_cell_backward, lstm_cell_backward
from .config import RecurrenceConfig, device_limits, pass_shape, select_config
from ..torch_backend import cell_mode, check_cell_arguments
from .forward import acc_dtype, check_buffers, device_guard, input_precision
from .indexing import sequence_lengths, step_time
from .exchange import load_exchanged
from .product import gate_tiles_dot, gather_product, resident, scatter_product
from .sync import group_barrier


@triton.jit(do_not_specialize=["T", "r_begin", "r_end", "max_spins"])
def birnn_bwd_kernel(
    out_ptr, grad_out_ptr, w_ptr, grad_pre_ptr, grad_h0_ptr, lengths_ptr, dh_ptr, xch_ptr, sync_ptr, err_ptr,
    saved_ptr, h0_ptr, c0_ptr, w_hr_ptr, aux_ptr, grad_c0_ptr, grad_hn_ptr, g_ptr, xg_ptr,
    T, B, H, U, r_begin, r_end, max_spins,
    stride_ot, stride_ob,
    stride_got, stride_gob,
    stride_gpt, stride_gpb,
    stride_gh0d, stride_gh0b,
    P, UP, stride_st,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, NR: tl.constexpr,
    SPLIT: tl.constexpr, BARRIER: tl.constexpr,
    CELL: tl.constexpr = 0, G: tl.constexpr = 1, PROJ: tl.constexpr = False, BLOCK_P: tl.constexpr = 16,
    BLOCK_KP: tl.constexpr = 16, NKP: tl.constexpr = 1, NRP: tl.constexpr = 1, EXCHANGE_DH: tl.constexpr = False,
    REDUCE: tl.constexpr = 1, KS: tl.constexpr = 1, KSP: tl.constexpr = 1,
):
    """One program: hidden units [p*U, p*U + U) (their G gates and, LSTM, c) and state units
    [p*UP, p*UP + UP) (h, P wide; the same units without a projection) of BLOCK_B rows of one direction,
    processing steps walked backwards from the group's longest row's last; iterations [r_begin,
    min(r_end, PHASES * n_steps + 1)) (iteration r finishes step r - 1 and starts step r; with a split
    projection each is two phases). A row keeps `dh = grad_h_n` (and dc = grad_c_n) until the walk
    reaches its last step. CELL: 0 Elman, 1 LSTM, 2 GRU. EXCHANGE_DH: the group exchanges partial sums of
    dh (each program's dz times its rows of W_hh); else dz itself (each program multiplies the group's dz
    by its columns of W_hh)."""
    p = tl.program_id(0)
    pid_b = tl.program_id(1)
    direction = tl.program_id(2)
    D = tl.num_programs(2)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    units = p * U + offs_n  # hidden units (gates, c)
    mask_n = (offs_n < U) & (units < H)
    mask_b = offs_b < B
    mask_bn = mask_b[:, None] & mask_n[None, :]
    if PROJ:  # state units (h, dh): P of them
        offs_p = tl.arange(0, BLOCK_P)
        punits = p * UP + offs_p
        mask_p = (offs_p < UP) & (punits < P)
        mask_bp = mask_b[:, None] & mask_p[None, :]
    else:  # the hidden units themselves, the same registers (P == H, UP == U, BLOCK_P == BLOCK_N): separate
        offs_p = offs_n  # index/mask tensors pushed Elman kernels past ptxas' register budget (stack spills)
        punits = units
        mask_p = mask_n
        mask_bp = mask_bn
    seq_len = sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS)
    n_steps = tl.max(seq_len, axis=0)
    # dh of the whole group in this program's registers: one program whose products are one resident chunk
    # each (dh = sum_g dz_g @ W_g, the exchange-free form of the partial sums)
    KEEP: tl.constexpr = (SPLIT == 1 and BARRIER and EXCHANGE_DH and NK == 1 and NR == 1 and BLOCK_K == BLOCK_P
                          and (not PROJ or (NKP == 1 and NRP == 1 and BLOCK_KP == BLOCK_P)))
    PHASES: tl.constexpr = 2 if PROJ and not KEEP else 1  # a split projection: exchange g, then dz or dh
    GH = G * H

    # the program's slice of W_hh: EXCHANGE_DH its rows [D, S, NK, G, BLOCK_N, BLOCK_K] (column chunks of
    # BLOCK_K, G gate tiles each); else its columns [D, S, NK, BLOCK_K, BLOCK_P] (K = G*H chunks)
    if EXCHANGE_DH:
        w_prog = w_ptr + ((direction * SPLIT + p) * NK * G * BLOCK_N).to(tl.int64) * BLOCK_K
        ws = resident(w_prog, NR * G, BLOCK_N, BLOCK_K, BLOCK_K, 0)
    else:
        w_prog = w_ptr + ((direction * SPLIT + p) * NK * BLOCK_K).to(tl.int64) * BLOCK_P
        ws = resident(w_prog, NR, BLOCK_K, BLOCK_P, BLOCK_P, 0, KS)
    if PROJ:  # W_hr[d][k, p*U + n] as chunks of wr[k, n]: dm = g @ W_hr[:, units]
        wr_prog = w_hr_ptr + ((direction * SPLIT + p) * NKP * BLOCK_KP).to(tl.int64) * BLOCK_N
        wrs = resident(wr_prog, NRP, BLOCK_KP, BLOCK_N, BLOCK_N, 0, KSP)
        xg_rows = xg_ptr + direction.to(tl.int64) * B * P + offs_b[:, None] * P
        g_rows = g_ptr + direction.to(tl.int64) * B * P + offs_b[:, None] * P + punits[None, :]

    if EXCHANGE_DH:  # xch [2, D, SPLIT, B, P]: program q's partial sums of dh over every state unit
        half = D.to(tl.int64) * SPLIT * B * P
        xch_own = xch_ptr + ((direction * SPLIT + p) * B).to(tl.int64) * P + offs_b[:, None] * P
        xch_group = xch_ptr + (direction * SPLIT * B).to(tl.int64) * P + offs_b[:, None] * P + punits[None, :]
    else:  # xch [2, D, B, G*H]: dz of the group
        half = D.to(tl.int64) * B * GH
        xch_rows = xch_ptr + direction.to(tl.int64) * B * GH + offs_b[:, None] * GH
    h_state = direction.to(tl.int64) * B * H + offs_b[:, None] * H + units[None, :]  # [D, B, H] buffers
    p_state = h_state  # [D, B, P] buffers (P == H without a projection)
    if PROJ:
        p_state = direction.to(tl.int64) * B * P + offs_b[:, None] * P + punits[None, :]
    bar = sync_ptr + direction * tl.num_programs(1) + pid_b
    pcol = direction * P + punits
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + pcol[None, :]
    go_ptrs = grad_out_ptr + offs_b[:, None] * stride_gob + pcol[None, :]
    if G == 1:  # Elman: P == G*H == H, the same columns (one index tensor fewer held across the loop)
        gp_ptrs = grad_pre_ptr + offs_b[:, None] * stride_gpb + pcol[None, :]
    else:
        gp_ptrs = grad_pre_ptr + offs_b[:, None] * stride_gpb + (direction * GH + units)[None, :]
    if CELL != 0:  # saved, processing order row s: [D, B, G, H] activations, then [D, B, H] (c or n)
        sv_ptrs = saved_ptr + (direction * B + offs_b[:, None]) * GH + units[None, :]
        sc_ptrs = saved_ptr + D.to(tl.int64) * B * GH + (direction * B + offs_b[:, None]) * H + units[None, :]
    if CELL == 1:
        c0_own = tl.load(c0_ptr + h_state, mask=mask_bn, other=0.0).to(ACC_DTYPE)
    if CELL == 2:  # P == H
        h0_own = tl.load(h0_ptr + h_state, mask=mask_bn, other=0.0).to(ACC_DTYPE)
        hn_ptrs = grad_hn_ptr + offs_b[:, None] * D * H + (direction * H + units)[None, :]  # [T, B, D*H]

    dh_own = tl.load(dh_ptr + p_state, mask=mask_bp, other=0.0)  # written by this program only
    aux = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    if CELL != 0:  # LSTM: dc (grad_c_n at first); GRU: the direct carry g*z of the last step started
        aux = tl.load(aux_ptr + h_state, mask=mask_bn, other=0.0)
    aborted = (r_begin < 0).to(tl.int32)
    # Iteration r finishes step r - 1 (dh from the group's exchange: the exchange sits between the two
    # halves, so the launch boundary of the launch-per-step mode can be that barrier) and starts step r
    # (dz, then its dz or partial dh published); n_steps + 1 iterations, the last one only finishing. With
    # a split projection an iteration is two phases, each ending at a barrier: [finish r - 1, g_r
    # published] and [dm_r = g_r @ W_hr, dz_r's exchange published]. KEEP (one program, dh in registers)
    # finishes each step in its own iteration. (A while loop: Triton 3.6's interpreter cannot take a
    # runtime range bound with numpy >= 2.4, NOTES-triton 8d.)
    LAST: tl.constexpr = 0 if KEEP else 1
    q = r_begin
    while q < tl.minimum(r_end, PHASES * n_steps + LAST):
        r = q // PHASES
        r_rows = tl.zeros_like(seq_len) + r  # per row: the interpreter mis-broadcasts 0-d & 1-d masks
        if not KEEP:
            if q % PHASES == 0:  # finish step r - 1: dh of the program's state units from the exchange
                _, active_prev = step_time(n_steps - r, direction, n_steps, seq_len)
                active_prev = active_prev & (r_rows > 0)
                if EXCHANGE_DH:  # the sum of the group's partial sums over this program's state units,
                    # REDUCE programs' [BLOCK_B, BLOCK_P] at a time (one load; summed within each thread
                    # and then across the warps, which split the programs), batches in order
                    dh_new = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC_DTYPE)
                    prev = xch_group + ((r + 1) % 2) * half
                    for q0 in tl.static_range(0, SPLIT, REDUCE):
                        offs_q = q0 + tl.arange(0, REDUCE)
                        part = load_exchanged(prev[None, :, :] + (offs_q * B * P)[:, None, None],
                                              (offs_q < SPLIT)[:, None, None] & mask_bp[None, :, :])
                        dh_new += tl.sum(part.to(ACC_DTYPE), axis=0)
                else:  # the group's dz of step r - 1 times this program's columns of W_hh
                    dh_new = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC_DTYPE)
                    dh_new = gather_product(xch_rows + ((r + 1) % 2) * half, mask_b, H, w_prog, ws, dh_new,
                                            NK, NK // G, NR, BLOCK_K, BLOCK_P, ACC_DTYPE, INPUT_PRECISION, KS)
                if CELL == 2:
                    dh_new += aux  # GRU: the direct path through h_s = n + z * (h_{s-1} - n)
                dh_own = tl.where(active_prev[:, None], dh_new, dh_own)
                if SPLIT > 1 and BARRIER:
                    dh_own = tl.where(aborted != 0, float("nan"), dh_own)
                    aux = tl.where(aborted != 0, float("nan"), aux)
                if PHASES == 2:  # g_r for the projection's exchange
                    t, active = step_time(n_steps - 1 - r, direction, n_steps, seq_len)
                    m_p = (active & (r_rows < n_steps))[:, None] & mask_p[None, :]
                    g = dh_own + tl.load(go_ptrs + t * stride_got, mask=m_p, other=0.0).to(ACC_DTYPE)
                    row = t + direction * (T - 1 - 2 * t)  # processing-order row of time t
                    tl.store(g_rows + row * D * B * P, g.to(g_ptr.dtype.element_ty), mask=m_p)
                    tl.store(xg_rows + punits[None, :], g.to(xg_ptr.dtype.element_ty),
                             mask=mask_bp & (r_rows < n_steps)[:, None])
        if q % PHASES == PHASES - 1:  # start step r: dz of the program's units, and its exchange published
            # step r's time and rows, here: live across the finishing product they cost registers (spills)
            t, active = step_time(n_steps - 1 - r, direction, n_steps, seq_len)
            active = active & (r_rows < n_steps)
            m_p = active[:, None] & mask_p[None, :]
            m_n = active[:, None] & mask_n[None, :]
            row = t + direction * (T - 1 - 2 * t)  # processing-order row of time t (saved, g)
            if PROJ:  # dm = g_all @ W_hr[:, units]: g of the whole group
                dm = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
                if PHASES == 1:  # one program: g in registers
                    g = dh_own + tl.load(go_ptrs + t * stride_got, mask=m_p, other=0.0).to(ACC_DTYPE)
                    tl.store(g_rows + row * D * B * P, g.to(g_ptr.dtype.element_ty), mask=m_p)
                    dm = tl.dot(g.to(wrs[0].dtype), wrs[0], acc=dm, input_precision=INPUT_PRECISION,
                                out_dtype=ACC_DTYPE)
                else:
                    dm = gather_product(xg_rows, mask_b, P, wr_prog, wrs, dm, NKP, NKP, NRP, BLOCK_KP, BLOCK_N,
                                        ACC_DTYPE, INPUT_PRECISION, KSP)
            else:
                g = dh_own + tl.load(go_ptrs + t * stride_got, mask=m_p, other=0.0).to(ACC_DTYPE)
                dm = g
            gp_t = gp_ptrs + t * stride_gpt
            if CELL == 0:
                h = tl.load(o_ptrs + t * stride_ot, mask=m_p, other=0.0).to(ACC_DTYPE)
                dz0 = cell_backward(g, h, RELU)
                dz1 = dz0
                dz2 = dz0
                dz3 = dz0
                tl.store(gp_t, dz0.to(grad_pre_ptr.dtype.element_ty), mask=m_n)
            else:
                # the row's first forward step reads the initial state (a reverse row starts at its own
                # last valid step), every other step the saved state of the previous row
                t_prev = t - 1 + 2 * direction
                t_prev_rows = tl.zeros_like(seq_len) + t_prev  # per row, as r_rows
                has_prev = ((t_prev_rows >= 0) & (t_prev_rows < seq_len))[:, None]
                sv = sv_ptrs + row * stride_st
                sc = sc_ptrs + row * stride_st
                a0 = tl.load(sv, mask=m_n, other=0.0).to(ACC_DTYPE)
                a1 = tl.load(sv + H, mask=m_n, other=0.0).to(ACC_DTYPE)
                a2 = tl.load(sv + 2 * H, mask=m_n, other=0.0).to(ACC_DTYPE)
                s_last = tl.load(sc, mask=m_n, other=0.0).to(ACC_DTYPE)  # c (LSTM) or n (GRU)
                if CELL == 1:
                    a3 = tl.load(sv + 3 * H, mask=m_n, other=0.0).to(ACC_DTYPE)
                    c_prev = tl.load(sc - stride_st, mask=m_n & has_prev, other=0.0).to(ACC_DTYPE)
                    c_prev = tl.where(has_prev, c_prev, c0_own)
                    dz0, dz1, dz2, dz3, aux = lstm_cell_backward(dm, aux, a0, a1, a2, a3, s_last, c_prev,
                                                                 active[:, None])
                    tl.store(gp_t + 3 * H, dz3.to(grad_pre_ptr.dtype.element_ty), mask=m_n)
                    tl.store(gp_t + 2 * H, dz2.to(grad_pre_ptr.dtype.element_ty), mask=m_n)
                else:
                    h_prev = tl.load(o_ptrs + t_prev * stride_ot, mask=m_n & has_prev, other=0.0).to(ACC_DTYPE)
                    h_prev = tl.where(has_prev, h_prev, h0_own)
                    dz0, dz1, dn, dz2, aux = gru_cell_backward(g, a0, a1, a2, s_last, h_prev, active[:, None])
                    dz3 = dz2
                    tl.store(gp_t + 2 * H, dn.to(grad_pre_ptr.dtype.element_ty), mask=m_n)  # input side
                    tl.store(hn_ptrs + t * B * D * H, dz2.to(grad_hn_ptr.dtype.element_ty), mask=m_n)
                tl.store(gp_t, dz0.to(grad_pre_ptr.dtype.element_ty), mask=m_n)
                tl.store(gp_t + H, dz1.to(grad_pre_ptr.dtype.element_ty), mask=m_n)
            # (GRU: the hidden side's n block is dn * r, returned as dz2)
            if KEEP:  # the one-program kernel: dh of the whole group right away
                w0 = ws[0]
                w1 = w0
                w2 = w0
                w3 = w0
                if G > 1:
                    w1 = ws[1]
                    w2 = ws[2]
                if G > 3:
                    w3 = ws[3]
                dh_new = gate_tiles_dot(dz0, dz1, dz2, dz3, w0, w1, w2, w3, G, ACC_DTYPE, INPUT_PRECISION)
                if CELL == 2:
                    dh_new += aux
                dh_own = tl.where(active[:, None], dh_new, dh_own)
            elif EXCHANGE_DH:  # publish this program's partial sums of dh over every state unit
                scatter_product(xch_own + (r % 2) * half, mask_b & (r_rows < n_steps), P, w_prog, ws,
                                dz0, dz1, dz2, dz3, NK, NR, G, BLOCK_N, BLOCK_K, ACC_DTYPE, INPUT_PRECISION)
            else:  # publish dz of step r; the group's comes back next iteration
                dst = xch_rows + (r % 2) * half + units[None, :]
                m_pub = mask_bn & (r_rows < n_steps)[:, None]
                tl.store(dst, dz0.to(xch_ptr.dtype.element_ty), mask=m_pub)
                if G > 1:
                    tl.store(dst + H, dz1.to(xch_ptr.dtype.element_ty), mask=m_pub)
                    tl.store(dst + 2 * H, dz2.to(xch_ptr.dtype.element_ty), mask=m_pub)
                if G > 3:
                    tl.store(dst + 3 * H, dz3.to(xch_ptr.dtype.element_ty), mask=m_pub)
        if not KEEP:
            if SPLIT > 1 and BARRIER:
                aborted = group_barrier(bar, (q - r_begin + 1) * SPLIT, max_spins, err_ptr, aborted)
            elif BARRIER:  # one program reading back through memory: its threads' stores first
                tl.debug_barrier()
        q += 1

    tl.store(dh_ptr + p_state, dh_own, mask=mask_bp)  # for the next launch (one launch per step)
    if CELL != 0:
        tl.store(aux_ptr + h_state, aux, mask=mask_bn)
    if (r_begin <= PHASES * n_steps) & (r_end >= PHASES * n_steps + LAST):  # this launch finished the last step
        tl.store(grad_h0_ptr + direction * stride_gh0d + offs_b[:, None] * stride_gh0b + punits[None, :],
                 dh_own.to(grad_h0_ptr.dtype.element_ty), mask=mask_bp)
        if CELL == 1:
            tl.store(grad_c0_ptr + h_state, aux.to(grad_c0_ptr.dtype.element_ty), mask=mask_bn)


# ----------------------------------------------------------------------------------------------- launchers
_CELL_IDS = {"RNN_TANH": (0, 1), "RNN_RELU": (0, 1), "LSTM": (1, 4), "GRU": (2, 3)}  # mode -> (CELL, G)


def kernel_constants(cfg: RecurrenceConfig, hidden_size: int, state_size: int, cell: str, proj: bool,
                     persistent: bool) -> dict:
    """What a launch of `birnn_bwd_kernel` with plan `cfg` specialises on (also for compile checks), from
    `config.pass_shape`: the constexprs BLOCK_N, BLOCK_P (a program's hidden and state units, padded),
    EXCHANGE_DH and REDUCE, BLOCK_K / NK / NR (the main product's chunk, chunk count and resident chunks:
    with EXCHANGE_DH column chunks of W_hh's P columns, else K chunks of the group's dz within each gate),
    BLOCK_KP / NKP / NRP (the projection's dm = g @ W_hr, K = P), SPLIT, CELL, G, PROJ, and the integers
    UP (state units per program) and PHASES (barriers a step: 2 for a split projection). `state_size`
    is P (H without a projection), `cell` nn.RNNBase's mode name, `persistent` the launch's BARRIER (the
    one-program kernel keeps dh in registers only in a persistent launch)."""
    H, P = hidden_size, state_size
    cell_id, G = _CELL_IDS[cell]
    shape = pass_shape(cfg, H, P, G, proj, forward=False, persistent=persistent)
    return dict(BLOCK_N=cfg.block_h, BLOCK_P=shape["block_p"], EXCHANGE_DH=shape["exchange"] == "dh",
                REDUCE=shape["reduce"], BLOCK_K=shape["block_k"], NK=shape["chunks"], NR=shape["resident"],
                BLOCK_KP=shape["block_k2"], NKP=shape["chunks2"], NRP=shape["resident2"],
                SPLIT=cfg.programs_per_group(H), CELL=cell_id, G=G, PROJ=proj, KS=shape["ks"],
                KSP=shape["ks2"] if proj else 1,
                UP=cfg.proj_units_per_program(H, P) if proj else cfg.units_per_program(H),
                PHASES=shape["exchanges"] if not shape["keep"] else 1)


def _run_backward(out, grad_out, grad_h_n, w_hh, grad_pre, grad_h0, *, mode, lengths, allow_tf32, config,
                  saved=None, h0=None, c0=None, grad_c_n=None, w_hr=None, grad_c0=None, grad_hn=None,
                  g_buf=None) -> None:
    """Plan and launch the backward recurrence of any cell into the given outputs (shapes checked by the
    callers; T, B > 0)."""
    T, B, _ = out.shape
    D, GH, P = w_hh.shape
    cell_id, G = _CELL_IDS[mode]
    H = GH // G
    proj = w_hr is not None
    device = out.device
    if config is not None:
        cfg = config
    elif cell_id == 0:  # the Elman plan, called as before (tests replace select_config with `lambda *a`)
        cfg = select_config(H, B, out.dtype, allow_tf32, device_limits(device), launch.split_override())
    else:  # the forward's plan: same arguments (kernels/config.py)
        cfg = select_config(H, B, out.dtype, allow_tf32, device_limits(device), launch.split_override(), mode,
                            P if proj else None)
    cfg.check(H)
    S, U, n_tiles = cfg.programs_per_group(H), cfg.units_per_program(H), cfg.num_batch_tiles(B)
    persistent = cfg.runs_persistent(H, T)
    shape = kernel_constants(cfg, H, P, mode, proj, persistent)
    UP, phases = shape.pop("UP"), shape.pop("PHASES")
    kw = dict(HAS_LENGTHS=lengths is not None, RELU=mode == "RNN_RELU", ACC_DTYPE=acc_dtype(out.dtype),
              INPUT_PRECISION=input_precision(out.dtype, allow_tf32), BLOCK_B=cfg.block_b,
              num_warps=cfg.warps(forward=False), **shape)
    if cfg.stages(H) is not None:
        kw["num_stages"] = cfg.stages(H)
    if cfg.max_registers is not None:
        kw["maxnreg"] = cfg.max_registers
    bn, bp, bk, nk = cfg.block_h, shape["BLOCK_P"], shape["BLOCK_K"], shape["NK"]
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    with device_guard(out):  # Triton launches on the current device: make it the tensors' device
        launch.raise_pending(device)
        if shape["EXCHANGE_DH"]:  # each program's rows of W_hh, by column chunks; partial sums of dh
            w = launch.row_slices(w_hh, G, S, U, bn, bk, nk)
            xch = out.new_zeros((2, D, S, B, P))
        else:  # each program's columns of W_hh, K = G*H in chunks within each gate; the group's dz
            per_gate = w_hh.view(D, G, H, P).new_zeros((D, G, nk // G * bk, P))
            per_gate[:, :, :H] = w_hh.view(D, G, H, P)
            w = launch.product_slices(per_gate.view(D, -1, P).transpose(1, 2), 1, S, UP, bp, bk, nk)
            xch = out.new_zeros((2, D, B, GH))  # zeros: iteration 0 multiplies a (masked-out) dz
        wr = (launch.product_slices(w_hr.transpose(1, 2), 1, S, U, bn, shape["BLOCK_KP"], shape["NKP"])
              if proj else None)
        dh = torch.empty((D, B, P), device=device, dtype=acc)
        dh.copy_(grad_h_n)
        aux = None
        if cell_id != 0:  # LSTM: dc, from grad_c_n; GRU: the direct carry
            aux = torch.zeros((D, B, H), device=device, dtype=acc)
            if grad_c_n is not None:
                aux.copy_(grad_c_n)
        xg = out.new_zeros((D, B, P)) if proj else None
        sync = torch.zeros(D * n_tiles, dtype=torch.int32, device=device)
        err = launch.error_flag(device)
        args = (out, grad_out, w, grad_pre, grad_h0, lengths, dh, xch, sync, err,
                saved, h0, c0, wr, aux, grad_c0, grad_hn, g_buf, xg, T, B, H, U)
        after = (out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
                 grad_pre.stride(0), grad_pre.stride(1), grad_h0.stride(0), grad_h0.stride(1),
                 P, UP, saved.stride(0) if saved is not None else 0)
        launch.run_steps(birnn_bwd_kernel, (S, n_tiles, D), args, after, phases * T + 1, persistent,
                         cfg.spin_limit(), kw, cooperative=launch.cooperative(cfg, S, device),
                         what=f"the backward of a {mode} layer (H={H}, B={B}, T={T}, S={S}) on {device}")
        if persistent and S > 1:
            launch.after_launch(device)


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
    """Launch the Elman backward recurrence (all directions, SPLIT programs per group); `grad_pre` and
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
    _run_backward(out, grad_out, grad_h_n, w_hh, grad_pre, grad_h0, mode="RNN_RELU" if relu else "RNN_TANH",
                  lengths=lengths, allow_tf32=allow_tf32, config=config)


def recurrence_backward(
    out: torch.Tensor,
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    w_hh: torch.Tensor,
    *,
    relu: bool = False,
    cell: str | None = None,
    lengths: torch.Tensor | None = None,
    saved: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
    grad_c_n: torch.Tensor | None = None,
    w_hr: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: RecurrenceConfig | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """BPTT of one layer, all directions, any cell, in one launch: the contract (arguments, `saved`
    layout, returns) of `fused_birnn.torch_backend.recurrence_backward`.

    Args:
        out: `[T, B, D*P]` the forward's output (0 at padded steps).
        grad_out: `[T, B, D*P]`, grad_h_n: `[D, B, P]`, grad_c_n: `[D, B, H]` or None (LSTM).
        w_hh: `[D, G*H, P]`.
        relu, cell, lengths: as for the forward (`lengths [B]` on out's device, values in [1, T]).
        saved: the forward's `saved` (LSTM, GRU), `[T, D*B*S*H]`.
        h0: `[D, B, P]`: GRU (its update gate's gradient reads h_{s-1}); ignored otherwise.
        c0: `[D, B, H]` (LSTM). w_hr: `[D, P, H]` (LSTM with a projection).
        allow_tf32: fp32 dots on TF32 tensor cores (GPU). config: a plan instead of `select_config`'s.

    Returns:
        `grad_pre [T, B, D*G*H]` (input side, 0 at padded steps), then Elman `grad_h0`; LSTM `grad_h0`,
        `grad_c0 [D, B, H]`, `grad_w_hr [D, P, H]` or None; GRU `grad_h0`, `grad_hn [T, B, D*H]` (the
        hidden side's n block).
    """
    mode = cell_mode(cell, relu)
    check_cell_arguments(mode, c0=c0, w_hr=w_hr, saved=saved, h0=h0 if mode == "GRU" else None,
                          grad_c_n=grad_c_n)
    cell_id, G = _CELL_IDS[mode]
    T, B, DP = out.shape
    D, GH, P = w_hh.shape
    H = GH // G
    proj = w_hr is not None
    check_buffers(GH == G * H and DP == D * P and grad_out.shape == out.shape and grad_h_n.shape == (D, B, P)
                  and (lengths is None or (lengths.shape == (B,) and lengths.device == out.device))
                  and (saved is None or (saved.shape[0] == T and saved.numel() == T * D * B * (G + 1) * H))
                  and (c0 is None or c0.shape == (D, B, H)) and (grad_c_n is None or grad_c_n.shape == (D, B, H))
                  and (h0 is None or h0.shape == (D, B, P)) and (not proj or w_hr.shape == (D, P, H))
                  and (proj or cell_id != 0 or P == H),
                  "recurrence_backward: shapes of out/grad_out [T, B, D*P], grad_h_n/h0 [D, B, P], w_hh "
                  "[D, G*H, P], c0/grad_c_n [D, B, H], w_hr [D, P, H], saved [T, D*B*(G+1)*H], lengths [B]")
    zeros_or_empty = out.new_zeros if lengths is not None else out.new_empty  # padded steps stay 0
    grad_pre = zeros_or_empty((T, B, D * GH))
    grad_h0 = out.new_empty((D, B, P))
    grad_c0 = out.new_empty((D, B, H)) if cell_id == 1 else None
    grad_hn = zeros_or_empty((T, B, D * H)) if cell_id == 2 else None
    g_buf = out.new_zeros((T, D, B, P)) if proj else None  # gradient reaching h_s, processing order
    if T == 0 or B == 0:  # nothing to launch
        grad_h0.copy_(grad_h_n)
        if grad_c0 is not None:
            grad_c0.copy_(grad_c_n) if grad_c_n is not None else grad_c0.zero_()
    else:
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        last = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
        _run_backward(last(out), last(grad_out), grad_h_n, w_hh.contiguous(), grad_pre, grad_h0, mode=mode,
                      lengths=lengths, allow_tf32=allow_tf32, config=config, saved=c(saved),
                      h0=c(h0) if cell_id == 2 else None, c0=c(c0), grad_c_n=grad_c_n, w_hr=c(w_hr),
                      grad_c0=grad_c0, grad_hn=grad_hn, g_buf=g_buf)
    if cell_id == 0:
        return grad_pre, grad_h0
    if cell_id == 2:
        return grad_pre, grad_h0, grad_hn
    grad_w_hr = None
    if proj:  # sum_s g_s^T m_s, m = o * tanh(c) recomputed off the loop, 0 where h did not come from it
        sv = saved.reshape(T, -1)
        m = sv[:, :D * B * 4 * H].view(T, D, B, 4, H)[:, :, :, 3] * torch.tanh(sv[:, D * B * 4 * H:].view(T, D, B, H))
        if lengths is not None:  # where, not a product: gates of padded steps may be inf or nan
            steps = torch.arange(T, device=out.device)
            times = torch.stack([steps, T - 1 - steps], 1)[:, :D]  # [T, D]
            m = torch.where((times[:, :, None] < lengths[None, None, :]).unsqueeze(-1), m, 0)
        grad_w_hr = torch.einsum("sdbp,sdbh->dph", g_buf, m)
    return grad_pre, grad_h0, grad_c0, grad_w_hr
