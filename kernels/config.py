"""Launch plans of the recurrence kernels: S cooperating programs per group, tiles, warps, K chunks and
residency, from the device's limits and a per-step cost estimate.

A group is (direction, batch tile of `block_b` rows); its H hidden units are divided among S programs
(kernels/forward.py). Each program's slice of `W_hh` (and of `W_hr`) is a sequence of K chunks
(`k_block`; `chunk_size`: up to 64 rows, K padded to the chunk, not to a power of two); the first
`resident_chunks` of a pass stay on chip for the whole launch (loaded once before the time loop: Triton
keeps a loop-invariant `tl.dot` operand in shared memory), the rest stream from L2 every step: fully
resident, partially resident (the slice does not fit) or streamed are one plan parameter. The gate
product is one dot per chunk with the gates side by side; the backward exchanges dz or the partial sums
of dh (`exchange`, kernels/backward.py); S = 1 with one chunk per product (`single_chunk`) keeps the
state in registers (no exchange, no barrier).

The plan (`select_config`) lists candidates (one program per group; for each batch tile and S, each
exchange) and fits each to the device (`_fit`): per pass the warps at which the gate product repeats no
MMA across warps (Triton lays out chained dots along N when N > M, else along M: `mma_replication`; a
narrower gathered product splits its K among the warps instead, `split_k`), as many resident chunks as
the shared memory holds (`pass_shared_bytes`, calibrated on compiles) within the registers a thread may
spend on them before the time loop (`RESIDENT_BYTES_PER_THREAD`; fp32 has its own bound and its own
K split on every target, TF32 dots being register-operand HMMA on sm_90 too: `split_k_outputs`),
whichever of these is estimated fastest; a persistent launch where every program of the grid is
resident at once (a cooperative launch on a GPU: kernels/launch.py; no margin), else one launch per step
(the launch boundary is the barrier; correct on any device). The lowest estimated forward + backward
step wins. `FUSED_BIRNN_SPLIT=S` (kernels/launch.py) forces S where a plan with that S fits.

Plans know the cell (`select_config(..., cell, proj_size)`): G gates per unit (the GRU's three padded to
four blocks in the forward's product), with an LSTM projection the W_hr slice and its own product after
the gate product's (its chunks counted after them for residency). The forward and the backward of a layer
use the same plan (same split and tiles; each pass its own warps, chunk and residency: `num_warps` /
`num_warps_forward`, `block_k` / `block_k_backward`, `resident_chunks` / `resident_chunks_backward`).
`pass_shape` is what one pass of a plan holds, multiplies and exchanges; the launchers specialise the
kernels on it and the compile checks read it.

Plans are device-aware: `DeviceLimits` carries shared memory per block and per SM, SM count and
registers; sm_86/sm_89/sm_120 allow 101,376 B per block, sm_80 166,912 B, sm_90 232,448 B.
`tests/test_compile.py` and `python -m fused_birnn.bench --suite rnn lstm-gru --compile-only` compile the
plans for sm_80, sm_86, sm_89 and sm_90, each planned with its own limits, and check shared memory,
spills, resident weights never loaded in the time loop, tensor-core MMAs per step against the useful
work, and for split plans the barrier's release/acquire and L1-bypassing exchange loads.

The cost model (`estimate_step_us`) is an estimate from stated assumptions, not a measurement: no GPU has
run these kernels. Its constants are in `COST`; a GPU run of the benchmark prints the estimate next to
the measurement so the first such run calibrates them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton

from .sync import ABORT_COUNT, MAX_SPINS

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, per compute
# capability; the launchers read the real device instead (`device_limits`).
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SHARED_PER_SM = {80: 167936, 86: 102400, 87: 167936, 89: 102400, 90: 233472, 100: 233472, 120: 102400}
TYPICAL_SMS = {80: 108, 86: 84, 87: 16, 89: 142, 90: 132, 100: 148, 120: 170}  # A100, A10, Orin, L40, H100 SXM

# Padded W_hh bytes allowed on chip in one program (S = 1). fp16 H=256 (128 KiB of operand, ~139 KiB with
# Triton's scratch) fits an A100 (163 KiB per block) and an H100 (227 KiB), not sm_86 (99 KiB).
ON_CHIP_MAX_BYTES = 128 * 1024
MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on a GPU
MAX_PROGRAMS_PER_DIRECTION = 64  # above this, grow the batch tile instead of the grid
FMA_ON_CHIP_MAX_TILE = 16 * 32  # block_b * block_h limit of the on-chip path without tensor cores
SPLIT_BLOCK_N = (16, 32, 64, 128)  # units per program the split plans try
MIN_CHUNK = 64  # a product's K chunk when K > 64 (`chunk_size`)
MAX_CHUNKS = 16  # chunks a product's K takes at most when the plan names no chunk
SPLIT_CHUNK = 64  # the split plans' K chunk at most
STREAMED_CHUNK = 4096  # 16-bit elements of one chunk of a split plan's slice at most (16 a thread at 8 warps)
REGISTERS_PER_THREAD_EST = 168  # plan-time estimate (the compile checks measure 72-255)
REDUCE_ELEMENTS = 32  # exchanged partial sums of dh one thread holds at a time (`pass_shape`)
SPLIT_K_OUTPUTS = {90: 1024}  # outputs (M x N) up to which a product splits its K among the warps; else 512
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# Triton before 3.9 (3.6 compiled here, the lent GPU machines' version; 3.7 and 3.8 not: taken as 3.6, the
# cautious reading) compiles some plans fitted to 3.9 differently (tests/test_compile.py under 3.6):
# - a batched dot (a product whose K the warps split, `pass_shape`'s KS) has its warps on the batch (KS)
#   dimension only, the rest repeating every MMA (KS = 4 and 2 at 8 warps executed 2x and 4x the useful
#   MMAs; 3.9 spreads them over the KS x M/16 x N/8 MMA tiles): `mma_replication` counts that;
# - gated split plans hold at most LEGACY_GATE_ACC_PER_THREAD gate accumulators a thread (the LSTM's
#   16 x 32 units with a projection at 2 warps, 32 a thread, spilled inside the loop on every target);
# - ptxas capped a 16-bit split forward at 128 registers on sm_89 and spilled: `maxnreg` 255 off sm_90;
# - the "dh" backward holds at most LEGACY_DH_RESIDENT_BYTES a thread (LSTM H=1024's 512 B spilled
#   inside the loop on sm_90), and one program holds a gated cell below 128 units only (LSTM H=128's
#   one-program backward spilled in the loop on sm_90);
# - Elman's fp32 (TF32) K splits hold at most 4 partial products a thread (H=1760's 16 x 16 split four
#   ways at 4 warps, 8 a thread, spilled in the loop on sm_80 and sm_89);
# - a plan run a launch per step streams its whole slice (it reads it from L2 at every launch anyway: the
#   Elman H=1760-2560 launch-per-step plans with resident chunks spilled in the loop on sm_90 at B >= 64).
# Every surveyed suite's plan (rnn and lstm-gru, fp32/TF32, fp16, bf16) compiled for sm_80, sm_86, sm_89 and
# sm_90 under 3.6 with no problem after these rules (`compile_report`, not committed as tables).
TRITON_VERSION = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
LEGACY_TRITON = TRITON_VERSION < (3, 9)
LEGACY_GATE_ACC_PER_THREAD = 16
LEGACY_DH_RESIDENT_BYTES = 384
# G, the gates per hidden unit, of each cell (nn.RNNBase's mode names; None: the Elman cell)
GATES = {None: 1, "RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
# gate accumulators (fp32) one thread may hold across the gate dots: G * block_b * block_n / (32 * warps);
# the Elman plans reach 64 (16 x 256 at 4 warps, no spills measured); gated plans keep the same bound
ACC_PER_THREAD_MAX = 32
MAX_WARPS = 8


def gate_count(cell: str | None) -> int:
    """G of a cell (1 Elman, 4 LSTM, 3 GRU); ValueError naming the cells otherwise."""
    if cell not in GATES:
        raise ValueError(f"cell: expected one of {sorted(k for k in GATES if k)} or None, got {cell!r}")
    return GATES[cell]

# The cost model's machine: an H100 SXM unless the device says otherwise (estimates, see module doc).
COST = dict(
    clock_ghz=1.75,          # sustained SM clock
    smem_bytes_per_clk=128,  # shared-memory bandwidth per SM
    l2_bytes_per_clk_sm=64,  # L2 -> one SM
    l2_total_tb_s=5.5,       # L2 bandwidth of the whole chip
    l2_latency_clk=600,      # one dependent L2 round trip (exchange read, atomic)
    mma_clk=(16, 33),        # (K per mma.sync for 16-bit; 8 for TF32), latency of one dependent MMA
    mma_fma_per_clk_sm=1024, # dense 16-bit tensor-core FMAs per clock and SM through mma.sync (TF32: half)
    fma_per_clk_sm=128,      # fp32 FMA lanes per SM (exact fp32: no tensor cores)
    step_fixed_clk=450,      # per step: activation, stores, layout conversions, loop overhead
    barrier_clk=1400,        # arrive (acq_rel atomic) + acquire poll round trips + 2 bar.sync
    launch_us=4.0,           # one kernel launch (the launch-per-step fallback)
)


@dataclass(frozen=True)
class DeviceLimits:
    """What a plan must fit: the limits of the device (or compile target) a launch runs on.

    Attributes:
        shared_per_block: shared memory one program may use, bytes (the opt-in maximum).
        sm_count: streaming multiprocessors.
        registers_per_sm: 32-bit registers per SM.
        shared_per_sm: shared memory per SM, bytes.
        name: what the limits describe (device name or `sm_XX`).
        unbounded: the interpreter: no limits, one program per group holds everything unless a split is
            forced.
        arch: the compute capability (e.g. 90; 0: unknown): ptxas' register allocation differs by target.
    """

    shared_per_block: int
    sm_count: int = 132
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472
    name: str = ""
    unbounded: bool = False
    arch: int = 0

    @staticmethod
    def for_arch(arch: int, sm_count: int | None = None) -> "DeviceLimits":
        """The limits of a compute capability (e.g. 86), with a typical SM count for it."""
        if arch not in SHARED_PER_BLOCK:
            raise ValueError(f"arch: no shared-memory limit known for sm_{arch} ({sorted(SHARED_PER_BLOCK)})")
        return DeviceLimits(SHARED_PER_BLOCK[arch], sm_count or TYPICAL_SMS[arch], 65536, SHARED_PER_SM[arch],
                            f"sm_{arch}", arch=arch)


DEFAULT_LIMITS = DeviceLimits.for_arch(80)  # a caller that names no device: an A100
INTERPRETER_LIMITS = DeviceLimits(1 << 40, 1, 1 << 40, 1 << 40, "interpreter", unbounded=True)


@lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    arch = p.major * 10 + p.minor
    per_block = int(getattr(p, "shared_memory_per_block_optin", 0)
                    or SHARED_PER_BLOCK.get(arch, SHARED_PER_BLOCK[80 if p.major < 9 else 90]))
    return DeviceLimits(per_block, int(p.multi_processor_count),
                        int(getattr(p, "regs_per_multiprocessor", 0) or 65536),
                        int(getattr(p, "shared_memory_per_multiprocessor", 0) or per_block + 1024),
                        f"{p.name} (sm_{arch})", arch=arch)


def device_limits(device: torch.device | None) -> DeviceLimits:
    """The limits of `device`: read from the CUDA device's properties (cached); the interpreter's (no
    limits) for a CPU device; `DEFAULT_LIMITS` for None."""
    if device is None:
        return DEFAULT_LIMITS
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_LIMITS


def chunk_size(K: int) -> int:
    """The K chunk of a product reducing over K when the plan names none: K itself (a power of two >= 16)
    up to 64, else the smallest power of two >= 64 that takes K in at most `MAX_CHUNKS` chunks (K is
    then padded to a multiple of 64 at least: 320 stays 320, 1760 -> 1792, 2560 -> 2560, not the next
    power of two)."""
    if K <= MIN_CHUNK:
        return max(MIN_DOT, triton.next_power_of_2(K))
    return max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(K, MAX_CHUNKS)))


@dataclass(frozen=True)
class RecurrenceConfig:
    """How one recurrence launch tiles its work.

    Attributes:
        block_b: batch rows per program (the `M` of every `tl.dot`, >= 16).
        block_h: hidden units one program owns, padded to a power of two (>= 16); for S = 1, H padded.
        w_on_chip: whether each program's slice of `W_hh` (and `W_hr`) stays on chip for the whole
            launch (every chunk resident) or is streamed from L2 every step (none resident); 
            `resident_chunks` sets a partial residency in between.
        num_warps: warps per program (the backward's).
        num_stages: Triton's software-pipelining stages; None: Triton's default.
        num_warps_forward: the forward kernel's warps where they differ from the backward's.
        split: S, programs per group; None: `cdiv(H, block_h)`.
        block_k: the K chunk of the forward's products (resident and streamed alike); None: `chunk_size`.
        persistent: one launch for all steps (in-kernel barrier when S > 1) or one launch per step;
            None: persistent, except S > 1 under the interpreter (whose programs run one after another).
        max_spins: polls of a barrier wait before the group aborts; None: `MAX_SPINS`.
        block_k_backward: the backward's chunk (of K, or of the columns with `exchange="dh"`) where it
            differs from the forward's.
        single_chunk: every product is one chunk (K padded to a power of two): the one-program kernel,
            whose state (forward) and dh (backward) then stay in its registers.
        resident_chunks: how many chunks of the forward's slice stay on chip (counted over the gate
            product's chunks, then the projection's); the rest stream from L2 each step. None: all if
            `w_on_chip`, else none.
        resident_chunks_backward: the same for the backward's slice (its main product's chunks, then the
            projection's).
        exchange: what the backward's programs exchange each step: "dz" (each program reads the group's
            dz, G*H values a row, and multiplies it by its columns of W_hh) or "dh" (each program
            publishes the partial sums of dh its own rows of W_hh give, and adds up the group's for its
            state units); None: "dh" for one program (no exchange: dh stays in registers), else "dz".
        cooperative: a persistent split launch asks CUDA for a cooperative launch (the whole grid
            co-resident, or the launch fails and the launcher falls back to one launch per step); None: yes.
        split_k: a gathered product too narrow for every warp to own columns of it, of at most this many
            outputs (M x N; 0: never), splits its K among the warps instead (one batched dot, the partial
            products summed: `pass_shape`'s `ks`).
        max_registers: ptxas' register bound a thread (Triton's `maxnreg`); None: ptxas chooses. The split
            plans for sm_80/86/89 set 255 for fp32 tensor-core dots, which ptxas otherwise may cap at 128
            (the NeMo LSTM's fp32 forward for sm_89: 128 registers and a spill inside the loop; clean at
            255); not for sm_90 (`FP32_MAX_REGISTERS`).
    """

    block_b: int
    block_h: int
    w_on_chip: bool
    num_warps: int = 4
    num_stages: int | None = None
    num_warps_forward: int | None = None
    split: int | None = None
    block_k: int | None = None
    persistent: bool | None = None
    max_spins: int | None = None
    block_k_backward: int | None = None
    single_chunk: bool = False
    resident_chunks: int | None = None
    resident_chunks_backward: int | None = None
    exchange: str | None = None
    cooperative: bool | None = None
    split_k: int = 512
    max_registers: int | None = None

    def warps(self, forward: bool) -> int:
        """Warps of the forward or the backward kernel."""
        return self.num_warps_forward if forward and self.num_warps_forward else self.num_warps

    def num_batch_tiles(self, batch_size: int) -> int:
        return triton.cdiv(batch_size, self.block_b)

    def programs_per_group(self, hidden_size: int) -> int:
        """S: programs sharing one group's hidden units."""
        return self.split or triton.cdiv(hidden_size, self.block_h)

    def units_per_program(self, hidden_size: int) -> int:
        """U = cdiv(H, S): units of program p are [p*U, p*U + U) (the last ones may be fewer)."""
        return triton.cdiv(hidden_size, self.programs_per_group(hidden_size))

    def k_block(self, K: int, forward: bool = True) -> int:
        """The chunk of a product reducing over K (the backward's "dh" exchange: of its columns): the
        plan's (`block_k`, `block_k_backward`), one power-of-two chunk with `single_chunk`, else
        `chunk_size(K)`."""
        explicit = self.block_k_backward if not forward and self.block_k_backward else self.block_k
        if explicit:
            return explicit
        if self.single_chunk:
            return max(MIN_DOT, triton.next_power_of_2(K))
        return chunk_size(K)

    def resident(self, chunks: int, forward: bool = True) -> int:
        """Of a pass's `chunks` slice chunks, how many stay on chip (the first ones)."""
        n = self.resident_chunks if forward else self.resident_chunks_backward
        if n is None:
            return chunks if self.w_on_chip else 0
        return max(0, min(n, chunks))

    def backward_exchange(self, hidden_size: int) -> str:
        """What the backward's programs exchange: "dz" or "dh" (the attribute `exchange`)."""
        if self.exchange is not None:
            return self.exchange
        return "dh" if self.programs_per_group(hidden_size) == 1 else "dz"

    def proj_units_per_program(self, hidden_size: int, proj_size: int) -> int:
        """UP = cdiv(P, S): with a projection (LSTM `proj_size` P) program p also owns the units
        [p*UP, p*UP + UP) of the projected state h (it owns the gates and c of its H units)."""
        return triton.cdiv(proj_size, self.programs_per_group(hidden_size))

    def block_p(self, hidden_size: int, proj_size: int) -> int:
        """The padded width of a program's slice of the projected state: the whole state for one program
        with `single_chunk` (it is then the next step's dot operand, `k_block(P)` wide), else UP padded."""
        if self.programs_per_group(hidden_size) == 1 and self.single_chunk:
            return self.k_block(proj_size)
        return max(MIN_DOT, triton.next_power_of_2(self.proj_units_per_program(hidden_size, proj_size)))

    def programs(self, hidden_size: int, batch_size: int, directions: int = 2) -> int:
        """Programs of one launch."""
        return self.programs_per_group(hidden_size) * self.num_batch_tiles(batch_size) * directions

    def runs_persistent(self, hidden_size: int, seq_len: int) -> bool:
        """One launch for all steps (else one per step)."""
        S = self.programs_per_group(hidden_size)
        if S == 1:
            return True  # nobody waits
        if S * (2 * seq_len + 2) >= ABORT_COUNT:  # the counter (<= 2 barriers a step) stays below it
            return False
        return self.persistent if self.persistent is not None else not INTERPRETER

    def stages(self, hidden_size: int) -> int | None:
        """The `num_stages` a launch compiles with: 1 wherever the exchange buffer or a streamed chunk is
        read (S > 1, or not every chunk resident): Triton's pipeliner turns even volatile loads into
        L1-allocating `cp.async.ca` (seen in the PTX), which could read a stale line of another SM's
        state; those kernels prefetch the next chunk by hand instead. Else `num_stages` (None: Triton's
        default)."""
        partial = (self.resident_chunks is not None or self.resident_chunks_backward is not None
                   or not self.single_chunk)
        if self.programs_per_group(hidden_size) > 1 or not self.w_on_chip or partial:
            return 1
        return self.num_stages

    def spin_limit(self) -> int:
        return self.max_spins if self.max_spins is not None else MAX_SPINS

    def check(self, hidden_size: int) -> None:
        """ValueError unless this configuration can run at this H."""
        S = self.programs_per_group(hidden_size)
        bad = []
        for name in ("block_b", "block_h", "block_k", "block_k_backward"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                bad.append(f"{name}={v} (a power of two)")
        if S < 1 or self.units_per_program(hidden_size) > self.block_h:
            bad.append(f"split={S} with block_h={self.block_h} at H={hidden_size} "
                       f"(each of the S programs owns cdiv(H, S) <= block_h units)")
        if self.single_chunk and S == 1 and self.block_h < hidden_size:
            bad.append(f"block_h={self.block_h} < H={hidden_size} with one program and one chunk")
        if self.exchange not in (None, "dz", "dh"):
            bad.append(f"exchange={self.exchange!r} ('dz' or 'dh')")
        for name in ("resident_chunks", "resident_chunks_backward"):
            v = getattr(self, name)
            if v is not None and v < 0:
                bad.append(f"{name}={v} (>= 0)")
        if bad:
            raise ValueError("config: " + "; ".join(bad) + " expected")


# ------------------------------------------------------------------------------------------ pass shapes
def pass_shape(cfg: RecurrenceConfig, hidden_size: int, state_size: int, gates: int, proj: bool,
               forward: bool = True, persistent: bool = True) -> dict:
    """What one pass of plan `cfg` holds, multiplies and exchanges per step and program (the kernels'
    launchers specialise on it, the cost model and the compile checks read it).

    Keys: `block_p` (a program's state units, padded), `block_k` / `chunks` / `resident` (the main
    product's chunk, chunk count and resident chunks: the forward's gate product over K = P; the backward's
    column chunks of W_hh with the "dh" exchange, else K chunks of dz within each gate), `block_k2` /
    `chunks2` / `resident2` (the projection's product, 0 chunks without one), `exchange` (the backward's
    "dz" or "dh"; None forward), `keep` (one program whose state, or dh, stays in its registers: no
    exchange), `products` (M, N, K and layout group of each product, per step: the dots Triton lays
    out together, `mma_replication`), `chunk_bytes` / `chunk_bytes2` (one chunk
    of each slice at `itemsize` 1), `exchange_read` / `exchange_write` (exchanged elements a step, read
    and written by the program), `exchanges` (barriers a step with S > 1), `reduce` (the backward's
    partial sums of dh added this many programs at a time)."""
    H, P, G = hidden_size, state_size, gates
    S, U, UP = cfg.programs_per_group(H), cfg.units_per_program(H), (
        cfg.proj_units_per_program(H, P) if proj else cfg.units_per_program(H))
    bb, bn = cfg.block_b, cfg.block_h
    bp = cfg.block_p(H, P) if proj else bn
    if forward:
        bk = cfg.k_block(P)
        nk = triton.cdiv(P, bk)
        bk2 = cfg.k_block(H) if proj else MIN_DOT
        nk2 = triton.cdiv(H, bk2) if proj else 0
        nr = cfg.resident(nk + nk2)
        # (the kernel's KEEP: every product one resident chunk, the state operand as wide as the chunk)
        keep = (S == 1 and persistent and nk == 1 and min(nr, nk) == 1 and bk == (bp if proj else bn)
                and (not proj or (nk2 == 1 and nr == 2 and bk2 == bn)))
        GP = 4 if G == 3 else G  # the GRU's gate blocks padded to four (the fourth zero)
        # the projection reads m back from the exchange buffer: a chain of its own for Triton's layouts,
        # unless one program keeps m in registers
        products = [(bb, GP * bn, nk * bk, 0)] + ([(bb, bp, nk2 * bk2, 0 if keep else 1)] if proj else [])
        chunk, chunk2 = bk * GP * bn, bk2 * bp
        read = 0 if keep else bb * P + (bb * H if proj else 0)
        write = 0 if keep else bb * UP + (bb * U if proj else 0)
        exchange, reduce = None, 1
    else:
        dh = cfg.backward_exchange(H) == "dh"
        bk = cfg.k_block(P if dh else H, forward=False)
        nk = triton.cdiv(P, bk) if dh else G * triton.cdiv(H, bk)
        bk2 = cfg.k_block(P, forward=False) if proj else MIN_DOT
        nk2 = triton.cdiv(P, bk2) if proj else 0
        nr = cfg.resident(nk + nk2, forward=False)
        keep = (S == 1 and persistent and dh and nk == 1 and min(nr, nk) == 1 and bk == bp
                and (not proj or (nk2 == 1 and nr == 2 and bk2 == bp)))  # (the kernel's KEEP)
        if dh:  # each program's rows of W_hh times its dz: per column chunk one [bb, bk] product of K = G*bn
            # (G dots), its own accumulator: nk independent chains, written as one product of that shape
            products = [(bb, bk, nk * G * bn, 0)]
            chunk = G * bn * bk
            read, write = (0, 0) if keep else (S * bb * bp, bb * P)
        else:  # the group's dz (K = G*H) times each program's columns of W_hh
            products = [(bb, bp, nk * bk, 0)]
            chunk = bk * bp
            read, write = bb * G * H, bb * G * U
        if proj:  # dm = g @ W_hr[:, units]: g exchanged (P values a row) unless kept
            products.append((bb, bn, nk2 * bk2, 0 if keep else 1))
            read, write = read + (0 if keep else bb * P), write + (0 if keep else bb * UP)
        chunk2 = bk2 * bn
        exchange = "dh" if dh else "dz"
        reduce = 1
        if dh:  # at most REDUCE_ELEMENTS a thread per load of [reduce, block_b, block_p]
            reduce = max(1, min(triton.next_power_of_2(S),
                                REDUCE_ELEMENTS * 32 * cfg.warps(forward=False) // (bb * bp)))
    # a gathered product (not the one program's dots from registers, not the "dh" scatter) that Triton's
    # layout would repeat on every warp splits its K among the warps (KS row blocks of each chunk)
    warps = cfg.warps(forward)
    gathered = [not keep and (forward or i > 0 or exchange == "dz") for i in range(len(products))]
    reps = mma_replication(products, warps)
    chunk_k = [bk, bk2]
    out = []
    for i, (m, n, k, group) in enumerate(products):
        ks = 1
        # (a narrow product only, at most `split_k` outputs, and its KS partial products, fp32, at most 8 a
        # thread: Elman's 32 x 32 split four ways at 4 warps spilled inside the loop, and two ways at 8 did
        # on sm_80/86/89, not on sm_90: SPLIT_K_OUTPUTS)
        if gathered[i] and reps[i] > 1 and m * n <= cfg.split_k:
            ks = min(warps, chunk_k[min(i, 1)] // MIN_DOT)
            while ks > 1 and ks * m * n > 8 * 32 * warps:
                ks //= 2
        out.append((m, n, k, group, ks))
    return dict(block_p=bp, block_k=bk, chunks=nk, resident=min(nr, nk), block_k2=bk2, chunks2=nk2,
                resident2=max(0, nr - nk), exchange=exchange, keep=keep, products=out, chunk_bytes=chunk,
                chunk_bytes2=chunk2, exchange_read=read, exchange_write=write,
                exchanges=2 if proj and not keep else 1, reduce=reduce,
                ks=out[0][4], ks2=out[-1][4] if len(out) > 1 else 1)


def mma_replication(products: list, num_warps: int) -> list[int]:
    """How many times each product's MMAs are executed over the useful work. Triton 3.6-3.9 lays out the
    2-D dots of one chain (connected through their operands and results: `warpsPerTileV2`'s slice) alike,
    every warp along N when N > M, else along M: a warp needs 8 columns (or 16 rows) of its own, the rest
    repeat. A product is (M, N, K, group[, ks]); a group is one such chain (a product read back from the
    exchange buffer starts its own). Where a group's products disagree on the direction, the first dot
    Triton converts decides: both are counted (the worse). A product whose K is split among the warps
    (ks > 1: one batched dot) takes no part in its group's layout; its warps go to its ks x M/16 x N/8
    MMA tiles and repeat only beyond them. Checked by the compile checks against the SASS (`fused_birnn.compile_report`)."""
    def rep(m, n, along_n):
        return max(1, num_warps // max(1, (n // 8 if along_n else m // 16)))

    out = []
    for p in products:
        m, n, _, group = p[:4]
        ks = p[4] if len(p) > 4 else 1
        if ks > 1:  # the batched dot's warps go to its KS x M/16 x N/8 tiles (seen: ks 4, 8 warps, [16, 16]),
            tiles = ks if LEGACY_TRITON else ks * max(1, m // 16) * max(1, n // 8)
            out.append(max(1, num_warps // tiles))  # on Triton before 3.9 to its KS batches only
            continue
        ways = {q[1] > q[0] for q in products if q[3] == group and (len(q) < 5 or q[4] == 1)}
        out.append(max(rep(m, n, along_n) for along_n in ways))
    return out


def fits_warps(products: list, least: int = 1, most: int = MAX_WARPS, main_only: bool = False) -> int:
    """The most warps (a power of two in [least, most]) at which no product (`main_only`: no product of
    the first one's group) repeats an MMA; `least` when even that repeats."""
    w = most
    while w > least:
        reps = mma_replication(products, w)
        if max(r for r, p in zip(reps, products) if not main_only or p[3] == products[0][3]) == 1:
            break
        w //= 2
    return w


def pass_shared_bytes(shape: dict, itemsize: int, block_b: int, forward: bool, gates: int = 1) -> int:
    """Estimated shared memory of a pass: its resident chunks, plus the largest buffer Triton stages
    through shared memory besides them (it reuses one region for buffers whose lives do not overlap): a
    chunk's A operand (with a streamed W chunk where chunks stream: both at once), the gate product's
    accumulator on its way to the gate split (fp32), the backward's dz tiles; and 4 KiB for the rest.
    Calibrated on compiles with Triton 3.9 (sm_80, sm_90): the resident chunks and the largest buffer to
    the byte for LSTM H=1024 16 x 64 x 1024 fp16 forward (135,168 B), 32 x 64 (139,264), GRU 32 x 48
    (102,400), Elman H=1760 32 x 32 (122,880), the LSTM 32 x 128 with 10 of 16 chunks resident (180,224),
    the backward's "dh" slice (16 x 16, 4 gates, 133,120); Elman H=1760's 16 x 64 slice fully resident took
    2 KiB more (233,472)."""
    res = shape["resident"] * shape["chunk_bytes"] + shape["resident2"] * shape["chunk_bytes2"]
    a = block_b * max(shape["block_k"], shape["block_k2"]) * itemsize  # a chunk's A operand
    streamed = max([shape["chunk_bytes"]] * (shape["resident"] < shape["chunks"])
                   + [shape["chunk_bytes2"]] * (shape["resident2"] < shape["chunks2"]), default=0) * itemsize
    staged = [a + streamed]  # a streamed chunk's dot stages both at once (Elman 1760, 27 of 28 resident)
    main_m, main_n = shape["products"][0][:2]
    if forward and gates > 1:
        staged.append(main_m * main_n * 4)  # the accumulator split into gates
    if not forward and shape["exchange"] == "dh":
        staged.append(gates * block_b * shape["block_k"] * itemsize)
    return res * itemsize + max(staged) + 4096


def programs_per_sm(limits: DeviceLimits, shared: int, num_warps: int) -> int:
    """How many such programs one SM holds at once (shared memory, registers at the plan-time estimate,
    32 blocks)."""
    by_shared = limits.shared_per_sm // max(shared + 1024, 1)  # 1 KiB reserved per block
    by_regs = limits.registers_per_sm // (REGISTERS_PER_THREAD_EST * 32 * num_warps)
    return max(0, min(by_shared, by_regs, 32))


# ------------------------------------------------------------------------------------------ cost model
def estimate_step_us(cfg: RecurrenceConfig, hidden_size: int, batch_size: int, dtype: torch.dtype,
                     allow_tf32: bool, limits: DeviceLimits | None = None, directions: int = 2,
                     gates: int = 1, proj_size: int = 0, forward: bool = True) -> dict:
    """Estimated time of one step of the forward (or backward) pass with `cfg` (an estimate from `COST`,
    not a measurement), and its parts in microseconds; `pass_shape` says what a program holds,
    multiplies and exchanges per step:

    * smem: bytes through one SM's shared memory per step / `smem_bytes_per_clk`: the resident chunks
      (read by the dots every step), each product's A operand (staged once, read by every warp that
      needs it: all of them when the warps split N) and the streamed chunks (staged), times the programs
      sharing the SM;
    * l2: bytes between L2 and one SM per step / `l2_bytes_per_clk_sm` (the streamed chunks, the
      exchange read and written, the per-step inputs and outputs), bounded below by the whole chip's L2
      bandwidth for all programs' bytes;
    * mma: the tensor cores' work (replicated MMAs counted) at `mma_fma_per_clk_sm`, or the dependent
      chain of each warp's MMAs (K/16 steps of `mma_clk` latency each, or the issue rate of its
      independent tiles, whichever is longer), whichever is longer; FMA dots at `fma_per_clk_sm`;
    * latency: fixed per-step work, for each exchange one L2 round trip and (S > 1) the barrier, for
      each streamed chunk what of an L2 round trip the previous chunk's dependent MMAs do not cover (chunk
      c + 1 is in flight while c multiplies; FMA dots: the whole round trip), and a launch per step (per
      phase) in the launch-per-step mode.

    Total = max(smem, l2, mma) + latency. Returns a dict with `us` and each part."""
    limits = limits or DeviceLimits.for_arch(90)
    c = COST
    clk = c["clock_ghz"] * 1e3  # cycles per microsecond
    H = hidden_size
    P = proj_size or H
    isz = dtype.itemsize
    S = cfg.programs_per_group(H)
    persistent = S == 1 or (cfg.persistent if cfg.persistent is not None else True)
    shape = pass_shape(cfg, H, P, gates, bool(proj_size), forward, persistent)
    warps = cfg.warps(forward)
    progs = cfg.programs(H, batch_size, directions)
    per_sm = max(1, triton.cdiv(progs, limits.sm_count))
    products = shape["products"]
    rep = mma_replication(products, warps)
    resident = shape["resident"] * shape["chunk_bytes"] + shape["resident2"] * shape["chunk_bytes2"]
    streamed = ((shape["chunks"] - shape["resident"]) * shape["chunk_bytes"]
                + (shape["chunks2"] - shape["resident2"]) * shape["chunk_bytes2"])
    # the A operand: staged once, then read by every warp that owns columns of the product (all of them
    # along N), by one warp per row block along M or with K split; a split K's partial sums meet in shared
    # memory (fp32, written and read)
    a_bytes = sum(m * k * (1 + (warps if n > m and ks == 1 else 1)) for m, n, k, _, ks in products)
    a_bytes += sum(2 * ks * m * n * 4 // isz for m, n, _, _, ks in products if ks > 1)
    smem = (resident * max(rep) + streamed + a_bytes) * isz * per_sm / c["smem_bytes_per_clk"]
    io = cfg.block_b * (gates + 2) * cfg.block_h  # x_proj in, out (and saved / grad_pre) out
    l2_bytes = (streamed + shape["exchange_read"] + shape["exchange_write"] + io) * isz
    l2 = max(l2_bytes * per_sm / c["l2_bytes_per_clk_sm"], progs * l2_bytes / (c["l2_total_tb_s"] * 1e6) * clk)
    fmas = sum(m * n * k * r for (m, n, k, _, _), r in zip(products, rep))
    fma = dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32)
    if fma:
        mma = fmas / c["fma_per_clk_sm"] * per_sm
    else:
        kstep = c["mma_clk"][0] if isz == 2 else 8
        rate = c["mma_fma_per_clk_sm"] / (1 if isz == 2 else 2)
        issue = 16 * 8 * kstep / (rate / 4)  # one m16n8k MMA on one of the SM's four tensor cores
        chain = 0.0
        for i, ((m, n, k, _, ks), r) in enumerate(zip(products, rep)):
            # independent MMA tiles of one warp; a split K: each warp's chain covers k / ks; the "dh" scatter's
            # column chunks are independent chains of K = G*block_n each (issued back to back)
            tiles = max(1, (m // 16) * (n // 8) * r * ks // warps)
            if i == 0 and shape["exchange"] == "dh" and not shape["keep"]:
                tiles *= shape["chunks"]
            t = (k / ks / kstep) * max(c["mma_clk"][1], tiles * issue) / (
                shape["chunks"] if i == 0 and shape["exchange"] == "dh" and not shape["keep"] else 1)
            chain += t  # each product waits for the one before it
        mma = max(chain, fmas / rate * per_sm)
    # a streamed chunk is in flight while the one before it multiplies: it costs the part of an L2 round
    # trip that its predecessor's dependent MMAs do not cover (those are in `mma` already)
    latency = c["step_fixed_clk"]
    if not fma:
        for (n_all, n_res, bk) in ((shape["chunks"], shape["resident"], shape["block_k"]),
                                   (shape["chunks2"], shape["resident2"], shape["block_k2"])):
            latency += (n_all - n_res) * max(0.0, c["l2_latency_clk"] - bk / kstep * c["mma_clk"][1])
    else:
        latency += (shape["chunks"] - shape["resident"] + shape["chunks2"] - shape["resident2"]) * c["l2_latency_clk"]
    if not shape["keep"]:
        latency += shape["exchanges"] * c["l2_latency_clk"]
        if S > 1:
            latency += shape["exchanges"] * c["barrier_clk"]
    us = (max(smem, l2, mma) + latency) / clk + (0 if persistent else shape["exchanges"] * c["launch_us"])
    return dict(us=round(us, 3), smem_us=round(smem / clk, 3), l2_us=round(l2 / clk, 3),
                mma_us=round(mma / clk, 3), latency_us=round(latency / clk, 3), programs=progs,
                sms=limits.sm_count, persistent=persistent, estimate=True,
                resident_chunks=shape["resident"] + shape["resident2"],
                chunks=shape["chunks"] + shape["chunks2"], exchange=shape["exchange"],
                replication=max(rep))


# ------------------------------------------------------------------------------------------ the plan
def _batch_tiles(batch_size: int) -> list[int]:
    """Batch tiles to try: 16 and 32 rows (64 only to keep the grid small at large batches)."""
    top = max(MIN_DOT, triton.next_power_of_2(batch_size))
    tiles = [b for b in (16, 32) if b <= top]
    if triton.cdiv(batch_size, 32) > MAX_PROGRAMS_PER_DIRECTION // 4:
        tiles.append(64)
    return tiles


def _one_program(H: int, B: int, dtype: torch.dtype, fma: bool, limits: DeviceLimits, gates: int = 1,
                 proj_size: int = 0) -> list[RecurrenceConfig]:
    """The one-program-per-group plans (S = 1, one chunk per product: the state stays in registers),
    where the whole slice fits and compiles without spills (bounds from the compile checks)."""
    P = proj_size or H
    block_h = max(MIN_DOT, triton.next_power_of_2(H))
    block_k = max(MIN_DOT, triton.next_power_of_2(P))
    out = []
    for block_b in _batch_tiles(B):
        if fma:
            # exact fp32 (and fp64) dots are FMA loops holding a K row per thread in registers: beyond a
            # 16 x 32 tile they spilled (fp32 H=50 and H=128 on sm_80/sm_90); G gates hold G such tiles
            if block_b > MIN_DOT or gates * max(block_h, block_k) > FMA_ON_CHIP_MAX_TILE // MIN_DOT:
                continue
        elif ((4 if gates == 3 else gates) * block_h * block_k + (block_k * block_h if proj_size else 0)
              ) * dtype.itemsize > ON_CHIP_MAX_BYTES:
            continue
        if LEGACY_TRITON and gates > 1 and block_h >= 128:
            continue
        cfg = RecurrenceConfig(block_b, block_h, True, 4, None, single_chunk=True, exchange="dh")
        fwd = pass_shape(cfg, H, P, gates, bool(proj_size), True)
        bwd = pass_shape(cfg, H, P, gates, bool(proj_size), False)
        # warps: 8 where 4 spilled (the compile checks: H >= 256, 32 x 128 tiles, FMA from 64 units, unaligned
        # H from 128; the gate accumulators at most ACC_PER_THREAD_MAX a thread), then as many as keep every
        # MMA unrepeated (fewer warps also read the state operand from shared memory fewer times)
        aligned = H % 16 == 0 and P % 16 == 0
        most = 8 if (block_h >= 256 or block_b * block_h >= 32 * 128 or (fma and block_h >= 64)
                     or (not aligned and block_h >= 128)) else 4
        while most < MAX_WARPS and gates * block_b * block_h > ACC_PER_THREAD_MAX * 32 * most:
            most *= 2
        wf, wb = fits_warps(fwd["products"], 1, most), fits_warps(bwd["products"], 1, most)
        cfg = replace(cfg, num_warps=wb, num_warps_forward=wf if wf != wb else None)
        shared = max(pass_shared_bytes(fwd, dtype.itemsize, block_b, True, gates),
                     pass_shared_bytes(bwd, dtype.itemsize, block_b, False, gates))
        # Triton's 3-stage pipelining of the per-step loads adds ~40 KiB at H = 256 (16-bit): one stage
        stages = None if shared + 40 * 1024 <= limits.shared_per_block and gates == 1 and block_h < 256 else 1
        if shared > limits.shared_per_block:
            continue
        out.append(replace(cfg, num_stages=stages))
    return out


def _split_plans(H: int, B: int, dtype: torch.dtype, fma: bool, limits: DeviceLimits,
                 splits: list[int] | None = None, gates: int = 1, proj_size: int = 0) -> list[RecurrenceConfig]:
    """Split plans (S > 1): for each batch tile, S (from `SPLIT_BLOCK_N` units a program, or `splits`)
    and the backward's exchange, the warps at which no product repeats an MMA, as many resident chunks
    as the device's shared memory holds (the rest streamed: partial residency), persistent (a
    cooperative launch) where every program of the grid is resident at once, else one launch per step."""
    out = []
    P = proj_size or H
    isz = dtype.itemsize
    if splits is None:
        splits = sorted({triton.cdiv(H, bn) for bn in SPLIT_BLOCK_N})
    for block_b in _batch_tiles(B):
        if fma and block_b > MIN_DOT:
            continue
        tiles = triton.cdiv(B, block_b)
        for S in splits:
            if S < 2 or S > H:
                continue
            block_n = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(H, S)))
            if fma:  # FMA dots hold operands in registers: 16-wide streamed chunks only (spills beyond)
                if block_n > MIN_DOT:
                    continue
                base = RecurrenceConfig(block_b, block_n, False, 8 if gates > 1 else 4, 1, split=S,
                                        block_k=MIN_DOT, block_k_backward=MIN_DOT, exchange="dz")
                candidates = [base]
            else:
                # chunks of at most SPLIT_CHUNK rows, and of at most STREAMED_CHUNK elements (a streamed
                # chunk's pointers are registers: 32 a thread at 8 warps)
                def chunk(K, cols):
                    fit = max(MIN_DOT, 1 << (max(1, STREAMED_CHUNK * 2 // isz // cols).bit_length() - 1))
                    return min(chunk_size(K), SPLIT_CHUNK, fit)
                GP = 4 if gates == 3 else gates
                BP = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(P, S))) if proj_size else block_n
                # ("dh": column chunks of at least 64, twice the batch tile: the warps split a chunk's columns
                # only when it is wider than the tile is tall; its streaming is bounded in `_fit`)
                candidates = [RecurrenceConfig(block_b, block_n, True, 4, 1, split=S, exchange=ex,
                                               split_k=split_k_outputs(limits, isz),
                                               block_k=chunk(P, GP * block_n),
                                               block_k_backward=(min(chunk_size(P), SPLIT_CHUNK) if ex == "dh"
                                                                 else chunk(H, BP)))
                              for ex in (("dz", "dh") if gates > 1 or proj_size else ("dz",))]
            for cfg in candidates:
                plan = _fit(cfg, H, P, gates, proj_size, isz, limits, tiles, fma, dtype, not fma, B)
                if plan is not None:
                    out.append(plan)
    return out


# resident slice bytes one thread may hold before the time loop: ptxas issues a pass's resident chunk loads
# ahead of their stores to shared memory and holds them in registers (Elman H=1760 at 2 warps, 1.75 KiB a
# thread: 255 registers and 1,256 B of stack; LSTM H=1024 at 4 warps, 1 KiB: 128 registers, clean); the
# "dh" backward's tiles all share dz as their other operand and their fragments are read together inside
# the loop (the LSTM's 128 KiB slice spilled at 4 warps, 0.5 KiB at 8 compiled clean)
RESIDENT_BYTES_PER_THREAD = {90: 1024}  # by compute capability; others 384 (LSTM H=1024's 1 KiB a thread
# compiled clean for sm_90, spilled inside the loop for sm_80; Elman H=1760's 448 B did too on sm_80)
RESIDENT_BYTES_PER_THREAD_ELSE = 384
DH_RESIDENT_BYTES_PER_THREAD = 512
# fp32 (TF32 or FMA) slices: 256 B a thread, either exchange (the LSTM and GRU H=1024 "dz" backward with
# 32-row tiles spilled inside the loop on sm_80 at 384 B a thread and compiled clean at 256 on every target;
# the LSTM H=2048 "dh" backward's 512 B spilled on sm_90)
FP32_RESIDENT_BYTES_PER_THREAD = 256


FP32_SPLIT_K_OUTPUTS = 256
# `RecurrenceConfig.max_registers` of fp32 tensor-core split plans, except for sm_90,
# where ptxas left alone compiled the Elman H=1760-2560 16 x 16 plans clean at 188 registers and, bounded at
# 255, took all of them and spilled inside the loop
FP32_MAX_REGISTERS = 255


def split_k_outputs(limits: DeviceLimits, isz: int) -> int:
    """The outputs (M x N) up to which a narrow product of `isz`-byte elements splits its K among the warps:
    `SPLIT_K_OUTPUTS` by target for 16-bit dtypes; for fp32 256 on every target, since a TF32 dot compiles
    to HMMA.1688 with register operands on sm_90 too (no wgmma) and Elman's 32 x 16 gate product split four
    ways spilled inside the loop on sm_80/86/89/90 wherever part of its slice streamed (the fp32 sweep)."""
    return SPLIT_K_OUTPUTS.get(limits.arch, 512) if isz == 2 else FP32_SPLIT_K_OUTPUTS


def _fit(cfg: RecurrenceConfig, H: int, P: int, gates: int, proj_size: int, isz: int, limits: DeviceLimits,
         tiles: int, fma: bool, dtype: torch.dtype = torch.float16, allow_tf32: bool = False,
         B: int = 16) -> RecurrenceConfig | None:
    """`cfg` with, per pass, the warps and resident chunks of lowest estimated step time (warps at which
    the gate product repeats no MMA; as many chunks on chip as the shared memory and the per-thread bound
    hold, the rest streamed), and its launch mode for the device; None when nothing fits."""
    proj = bool(proj_size)
    limit = limits.shared_per_block
    chosen = {}
    for forward in (True, False):
        key = "resident_chunks" if forward else "resident_chunks_backward"
        shape = pass_shape(cfg, H, P, gates, proj, forward)
        if fma:
            options = [(cfg.num_warps, 0)]
        else:
            per_thread = (FP32_RESIDENT_BYTES_PER_THREAD if isz > 2
                          else (LEGACY_DH_RESIDENT_BYTES if LEGACY_TRITON else DH_RESIDENT_BYTES_PER_THREAD)
                          if shape["exchange"] == "dh"
                          else RESIDENT_BYTES_PER_THREAD.get(limits.arch, RESIDENT_BYTES_PER_THREAD_ELSE))
            options = []
            held_max = (shape["chunks"] * shape["chunk_bytes"] + shape["chunks2"] * shape["chunk_bytes2"]) * isz
            # (the "dh" backward at 8 warps only: at 4 its column chunks' dots spilled inside the loop)
            for w in (8,) if shape["exchange"] == "dh" else (2, 4, 8):
                wcfg = replace(cfg, num_warps=w, num_warps_forward=None)
                wshape = pass_shape(wcfg, H, P, gates, proj, forward)
                # the gate (main) product must not repeat its MMAs on several warps; 2 warps only for small
                # slices (at 2 warps a 96-112 KiB slice spilled inside the loop); a state chunk at most 64 B
                # a thread and a streamed chunk 32 B (two in flight; their pointers are registers too:
                # 128-wide chunks at 2 warps spilled kilobytes, 64 x 64 at 4 warps a few values, fp32 twice
                # the 16-bit bytes did)
                if (mma_replication(wshape["products"], w)[0] > 1 or (w == 2 and held_max > 32 * 1024)
                        or cfg.block_b * shape["block_k"] * isz > 64 * 32 * w
                        or (LEGACY_TRITON and gates > 1
                            and gates * cfg.block_b * cfg.block_h > LEGACY_GATE_ACC_PER_THREAD * 32 * w)
                        or (LEGACY_TRITON and isz > 2 and gates == 1
                            and any(p[4] > 1 and p[4] * p[0] * p[1] > 4 * 32 * w for p in wshape["products"]))):
                    continue
                nr = shape["chunks"] + shape["chunks2"]
                while nr > 0:
                    trial = pass_shape(replace(wcfg, **{key: nr}), H, P, gates, proj, forward)
                    held = (trial["resident"] * trial["chunk_bytes"] + trial["resident2"] * trial["chunk_bytes2"]) * isz
                    if (pass_shared_bytes(trial, isz, cfg.block_b, forward, gates) <= limit
                            and held <= per_thread * 32 * w):
                        break
                    nr -= 1
                streams = [b for n_all, n_res, b in ((shape["chunks"], min(nr, shape["chunks"]), shape["chunk_bytes"]),
                                                     (shape["chunks2"], max(0, nr - shape["chunks"]),
                                                      shape["chunk_bytes2"])) if n_res < n_all]
                if max(streams, default=0) * isz > 32 * 32 * w:  # two in flight (prefetch): 64 B a thread
                    continue
                options.append((w, nr))
        best = None
        for w, nr in options:
            trial = replace(cfg, num_warps=w, num_warps_forward=None, **{key: nr})
            shape = pass_shape(trial, H, P, gates, proj, forward)
            if pass_shared_bytes(shape, isz, cfg.block_b, forward, gates) > limit:
                continue
            est = estimate_step_us(trial, H, B, dtype, allow_tf32, limits, 2, gates, proj_size, forward)["us"]
            if best is None or est < best[0]:
                best = (est, w, nr)
        if best is None:
            return None
        chosen[forward] = best[1:]
    (wf, nrf), (wb, nrb) = chosen[True], chosen[False]
    cfg = replace(cfg, num_warps=wb, num_warps_forward=wf if wf != wb else None, resident_chunks=nrf,
                  resident_chunks_backward=nrb, w_on_chip=nrf > 0)
    shared = max(pass_shared_bytes(pass_shape(cfg, H, P, gates, proj, f), isz, cfg.block_b, f, gates)
                 for f in (True, False))
    S = cfg.programs_per_group(H)
    capacity = programs_per_sm(limits, shared, max(wf, wb)) * limits.sm_count
    bounded = not fma and limits.arch != 90 and (isz > 2 or LEGACY_TRITON)
    persistent = S * tiles * 2 <= capacity
    streamed = replace(cfg, resident_chunks=0, resident_chunks_backward=0, w_on_chip=False)
    if LEGACY_TRITON and not persistent and all(  # a launch per step reads its slice from L2 at every launch
            max(sh["chunk_bytes"], sh["chunk_bytes2"] if sh["chunks2"] else 0) * isz <= 32 * 32 * w  # anyway
            for f, w in ((True, wf), (False, wb)) for sh in [pass_shape(streamed, H, P, gates, proj, f)]):
        cfg = streamed  # (each chunk within the streamed bound above: 64 B a thread, two in flight)
    return replace(cfg, persistent=persistent, cooperative=True,
                   max_registers=FP32_MAX_REGISTERS if bounded else None)


def select_config(hidden_size: int, batch_size: int, dtype: torch.dtype, allow_tf32: bool = False,
                  limits: DeviceLimits | None = None, split: int | None = None, cell: str | None = None,
                  proj_size: int | None = None) -> RecurrenceConfig:
    """The plan the forward and the backward recurrence use for this (H, B, dtype), for fp32 whether
    `tl.dot` may use TF32 tensor cores, on a device with `limits` (None: `DEFAULT_LIMITS`), with `split`
    programs per group where given and possible (`FUSED_BIRNN_SPLIT`), for the `cell` (nn.RNNBase's
    mode names, None: Elman; G = `gate_count(cell)` gates) and an LSTM's `proj_size` (None or 0: no
    projection; then the state h is P = proj_size wide and each program also owns UP = cdiv(P, S) of its
    units, `RecurrenceConfig.block_p`). The forward and the backward of one layer must be planned with
    the same arguments. Plans are sized for a bidirectional launch (D = 2); a unidirectional one uses
    half the programs. Among the candidates the lowest estimated forward + backward step wins
    (`estimate_step_us`: an estimate, not a measurement)."""
    limits = limits or DEFAULT_LIMITS
    H, B = hidden_size, batch_size
    gates = gate_count(cell)
    P = proj_size or 0
    if P and cell != "LSTM":
        raise ValueError(f"proj_size: only the LSTM cell has a projection, got cell={cell!r}")
    fma = dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32)
    if limits.unbounded:  # the interpreter: one program per group holds everything, unless told
        S = max(1, min(split or 1, H))
        block_h = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(H, S)))
        return RecurrenceConfig(MIN_DOT if B <= MIN_DOT else 32 if B <= 32 else 64, block_h, True,
                                split=S if S > 1 else None, single_chunk=S == 1)
    ones = _one_program(H, B, dtype, fma, limits, gates, P)
    if split is not None:  # FUSED_BIRNN_SPLIT: that S wherever a plan with it fits
        candidates = ones if split == 1 else _split_plans(H, B, dtype, fma, limits, [split], gates, P)
        if not candidates:
            candidates = ones + _split_plans(H, B, dtype, fma, limits, None, gates, P)
    else:
        candidates = ones + _split_plans(H, B, dtype, fma, limits, None, gates, P)
    if not candidates:  # nothing fits one program (cannot happen with 16-wide streamed tiles; keep a safe plan)
        return RecurrenceConfig(MIN_DOT, MIN_DOT, False, 4, 1, block_k=MIN_DOT, block_k_backward=MIN_DOT,
                                persistent=False, split=triton.cdiv(H, MIN_DOT), exchange="dz")

    def cost(c):
        return sum(estimate_step_us(c, H, B, dtype, allow_tf32, limits, 2, gates, P, forward=f)["us"]
                   for f in (True, False))
    return min(candidates, key=cost)
