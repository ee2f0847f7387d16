"""Launch plans of the recurrence kernels: S cooperating programs per group, tiles and warps, from the
device's limits and a per-step cost estimate.

A group is (direction, batch tile of `block_b` rows); its H hidden units are divided among S programs
(kernels/forward.py). Two ways to hold a program's slice of `W_hh`:

* on chip (`w_on_chip=True`): loaded once before the time loop ([H, U] padded to
  `k_block x block_h`); Triton keeps it in shared memory as the `tl.dot` operand. The state of the whole
  group is the dot's other operand, so `k_block = next_power_of_2(H)` bounds this to moderate H.
  S = 1 is the one-program-per-group kernel (the state stays in registers, no barrier).
* streamed (`w_on_chip=False`): every step walks the slice in `block_k` chunks from L2; any H.

The plan (`select_config`) lists the candidates that fit the device, keeps those whose grid is resident
in one wave with margin (`RESIDENT_FRACTION` of the SMs' capacity: no cooperative launch in Triton, so
an in-kernel barrier needs every program of a launch running at once), and picks the lowest estimated
time per step (`estimate_step_us`). Where no split plan is resident, the launch-per-step mode runs
(`persistent=False`: the launch boundary is the barrier; correct on any device, a launch per step).
`FUSED_BIRNN_SPLIT=S` (kernels/launch.py) forces S where a candidate with that S exists.

Plans know the cell (`select_config(..., cell, proj_size)`): a gated cell's program holds G slices of
W_hh (G = 4 LSTM, 3 GRU; K = P, the state width) and G accumulators, and with an LSTM projection also
its rows of W_hr ([UP, H]) and a second dot over H; the bounds below (shared bytes, accumulators per
thread, warps, streamed K chunks) take G and P into account, and the cost model counts the G dots, the
projection and its second exchange. The forward and the backward of a layer use the same plan (same
arguments, same split and tiles); the gated backward, which holds G dz tiles and the carried dc beside its
slices, may take more warps (`num_warps` against `num_warps_forward`: 8 for 4 on chip) or, with a
projection, a narrower streamed K chunk (`block_k_backward`), and one wave is then checked with the
larger warp count. Elman plans are exactly what they were before the cells were added.

Plans are device-aware: `DeviceLimits` carries shared memory per block and per SM, SM count and
registers; sm_86/sm_89/sm_120 allow 101,376 B per block, sm_80 166,912 B, sm_90 232,448 B.
`tests/test_compile.py` compiles every configuration this table returns at representative sizes for
sm_80, sm_86, sm_89 and sm_90, each planned with its own limits, and checks shared memory, spills,
tensor-core use and, for split plans, the barrier's release/acquire and L1-bypassing exchange loads.

The cost model (`estimate_step_us`) is an estimate from stated assumptions, not a measurement: no GPU has
run these kernels. Its constants are in `COST`; a GPU run of the benchmark prints the estimate next to
the measurement so the first such run calibrates them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton

from .sync import ABORT_COUNT, MAX_SPINS

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, per compute
# capability; the launchers read the real device instead (`device_limits`).
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SHARED_PER_SM = {80: 167936, 86: 102400, 87: 167936, 89: 102400, 90: 233472, 100: 233472, 120: 102400}
TYPICAL_SMS = {80: 108, 86: 84, 87: 16, 89: 128, 90: 132, 100: 148, 120: 170}

# Padded W_hh bytes allowed on chip in one program (S = 1). fp16 H=256 (128 KiB of operand, ~139 KiB with
# Triton's scratch) fits an A100 (163 KiB per block) and an H100 (227 KiB), not sm_86 (99 KiB).
ON_CHIP_MAX_BYTES = 128 * 1024
# Tile edge of the streamed path on tensor cores (the K chunk); FMA dots use MIN_DOT.
STREAMED_BLOCK_H = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32, torch.float64: 32}
MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on a GPU
MAX_PROGRAMS_PER_DIRECTION = 64  # above this, grow the batch tile instead of the grid
FMA_ON_CHIP_MAX_TILE = 16 * 32  # block_b * block_h limit of the on-chip path without tensor cores
SPLIT_BLOCK_N = (16, 32, 64, 128)  # units per program the split plans try
MAX_SPLIT_K = 1024  # on-chip split: the group's state [block_b, next_pow2(H)] is the dot's A operand
MIN_CHUNK = 64  # a product's K chunk when K > 64 (`chunk_size`)
MAX_CHUNKS = 16  # chunks a product's K takes at most when the plan names no chunk
RESIDENT_FRACTION = 0.9  # of the SMs' program capacity a persistent split grid may take (margin)
REGISTERS_PER_THREAD_EST = 168  # plan-time estimate (the compile checks measure 72-170)
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
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
    """

    shared_per_block: int
    sm_count: int = 132
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472
    name: str = ""
    unbounded: bool = False

    @staticmethod
    def for_arch(arch: int, sm_count: int | None = None) -> "DeviceLimits":
        """The limits of a compute capability (e.g. 86), with a typical SM count for it."""
        if arch not in SHARED_PER_BLOCK:
            raise ValueError(f"arch: no shared-memory limit known for sm_{arch} ({sorted(SHARED_PER_BLOCK)})")
        return DeviceLimits(SHARED_PER_BLOCK[arch], sm_count or TYPICAL_SMS[arch], 65536, SHARED_PER_SM[arch],
                            f"sm_{arch}")


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
                        f"{p.name} (sm_{arch})")


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


# ------------------------------------------------------------------------------------------ resources
def onchip_shared_bytes(block_b: int, block_h: int, itemsize: int, num_stages: int | None,
                        forward: bool, block_k: int | None = None, gates: int = 1, proj_elems: int = 0) -> int:
    """Estimated shared memory of an on-chip program: its W_hh slice (block_k x block_h), the group's
    state as the dot's A operand (block_b x block_k) and, for the backward, the per-step loads (out,
    grad_out, block_b x block_h) the pipeliner prefetches num_stages - 1 steps ahead. For S = 1
    (block_k = block_h) it matches Triton 3.6/3.9 on the sizes the compile checks cover (fp16 H=256
    139,264 B; TF32 backward H=128 106,496 B at 3 stages). Gated cells keep G such slices (one per gate)
    and, with a projection, the W_hr slice (`proj_elems` elements) and the A operand of its dot."""
    block_k = block_k or block_h
    stages = 3 if num_stages is None else num_stages
    prefetched = 0 if forward else 2 * (stages - 1) * block_b * block_h * gates * itemsize
    proj = (proj_elems + (block_b * block_h if proj_elems else 0)) * itemsize
    return gates * block_k * block_h * itemsize + block_b * block_k * itemsize + prefetched + proj


def streamed_shared_bytes(block_b: int, block_n: int, block_k: int, itemsize: int, stages: int = 3,
                          gates: int = 1) -> int:
    """Estimated shared memory of a streamed program: `stages` buffers of the W chunks (one per gate) and
    the state chunk."""
    return stages * (gates * block_k * block_n + block_b * block_k) * max(itemsize, 2)


def gate_warps(block_b: int, block_n: int, gates: int, least: int = 4) -> int | None:
    """Warps that keep the G gate accumulators within `ACC_PER_THREAD_MAX` per thread (at least `least`),
    or None when even `MAX_WARPS` do not."""
    warps = least
    while gates * block_b * block_n > ACC_PER_THREAD_MAX * 32 * warps:
        warps *= 2
    return warps if warps <= MAX_WARPS else None


def programs_per_sm(limits: DeviceLimits, shared: int, num_warps: int) -> int:
    """How many such programs one SM holds at once (shared memory, registers, 32 blocks)."""
    by_shared = limits.shared_per_sm // max(shared + 1024, 1)  # 1 KiB reserved per block
    by_regs = limits.registers_per_sm // (REGISTERS_PER_THREAD_EST * 32 * num_warps)
    return max(0, min(by_shared, by_regs, 32))


# ------------------------------------------------------------------------------------------ cost model
def estimate_step_us(cfg: RecurrenceConfig, hidden_size: int, batch_size: int, dtype: torch.dtype,
                     allow_tf32: bool, limits: DeviceLimits | None = None, directions: int = 2,
                     gates: int = 1, proj_size: int = 0) -> dict:
    """Estimated time of one forward step of a launch with `cfg` (an estimate from `COST`, not a
    measurement), and its parts in microseconds:

    * smem: bytes through one SM's shared memory per step (W slice re-read by the dot, the state operand
      written and read by each warp, streamed chunks staged) / `smem_bytes_per_clk`, times the programs
      sharing that SM;
    * l2: bytes from L2 per step into one SM (streamed W, the exchanged state) / `l2_bytes_per_clk_sm`,
      bounded below by the whole chip's L2 bandwidth for all programs' bytes;
    * mma: the dependent MMA (or FMA) chain over K; streamed, at least one L2 round trip per K chunk (the
      next chunk is prefetched by hand, one ahead);
    * latency: fixed per-step work, one exchange round trip and the barrier (S > 1), a launch per step
      in the launch-per-step mode.

    Gated cells (`gates` G: 4 LSTM, 3 GRU) multiply the W bytes and the MMAs by G: the G dots are
    independent chains, so the chain latency stays one gate's while the tensor cores' throughput
    (`mma_fma_per_clk_sm`) bounds G chains together. A projection (`proj_size` P > 0) adds, after the
    cell, a second dependent dot over H (its chain and W_hr bytes), and for S > 1 a second exchange round
    trip and barrier; the gate dot's K is P there.

    Total = max(smem, l2, mma) + latency. Returns a dict with `us` and each part."""
    limits = limits or DeviceLimits.for_arch(90)
    c = COST
    clk = c["clock_ghz"] * 1e3  # cycles per microsecond
    H = hidden_size
    P = proj_size or H  # the state's width: the gate dot's K
    itemsize = dtype.itemsize
    S = cfg.programs_per_group(H)
    bn, bk, bb = cfg.block_h, cfg.k_block(P), cfg.block_b
    k_full = bk if cfg.w_on_chip else triton.cdiv(P, bk) * bk
    k_proj = 0  # the projection dot's K (over H), 0 without one
    bp = 0
    if proj_size:
        k_proj = cfg.k_block(H) if cfg.w_on_chip else triton.cdiv(H, cfg.k_block(H)) * cfg.k_block(H)
        bp = cfg.block_p(H, proj_size)
    warps = cfg.warps(forward=True)
    progs = cfg.programs(H, batch_size, directions)
    per_sm = max(1, triton.cdiv(progs, limits.sm_count))
    w_bytes = (gates * k_full * bn + k_proj * bp) * itemsize
    a_bytes = bb * (k_full + k_proj) * max(itemsize, 2)
    smem = (w_bytes + a_bytes * (1 + min(warps, max(1, gates * bn // 16)))) * per_sm / c["smem_bytes_per_clk"]
    exch = 0 if (S == 1 and cfg.w_on_chip) else a_bytes
    l2_bytes = exch + (0 if cfg.w_on_chip else w_bytes)
    l2 = max(l2_bytes * per_sm / c["l2_bytes_per_clk_sm"], progs * l2_bytes / (c["l2_total_tb_s"] * 1e6) * clk)
    fma = dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32)
    if fma:
        mma = bb * (gates * bn * k_full + bp * k_proj) / c["fma_per_clk_sm"] * per_sm
    else:
        k_per_mma = c["mma_clk"][0] if itemsize == 2 else 8
        chain = (k_full + k_proj) / k_per_mma * c["mma_clk"][1]
        rate = c["mma_fma_per_clk_sm"] / (1 if itemsize == 2 else 2)
        mma = max(chain, bb * (gates * bn * k_full + bp * k_proj) / rate * per_sm)
    if not cfg.w_on_chip:  # chunk k + 1 is prefetched during chunk k (num_stages=1): a chunk costs at least
        chunks = triton.cdiv(P, bk) + (triton.cdiv(H, cfg.k_block(H)) if proj_size else 0)
        mma = max(mma, chunks * c["l2_latency_clk"])  # one L2 round trip
    exchanges = 2 if proj_size and exch else 1
    latency = c["step_fixed_clk"] + (exchanges * c["l2_latency_clk"] if exch else 0)
    if S > 1:
        latency += exchanges * c["barrier_clk"]
    persistent = cfg.persistent if cfg.persistent is not None else True
    us = (max(smem, l2, mma) + latency) / clk + (0 if persistent or S == 1 else exchanges * c["launch_us"])
    return dict(us=round(us, 3), smem_us=round(smem / clk, 3), l2_us=round(l2 / clk, 3),
                mma_us=round(mma / clk, 3), latency_us=round(latency / clk, 3), programs=progs,
                sms=limits.sm_count, persistent=persistent or S == 1, estimate=True)


# ------------------------------------------------------------------------------------------ the plan
def _batch_tile(batch_size: int) -> int:
    block_b = MIN_DOT
    while block_b < 64 and triton.cdiv(batch_size, block_b) > MAX_PROGRAMS_PER_DIRECTION:
        block_b *= 2
    return block_b


def _one_program(H: int, block_b: int, dtype: torch.dtype, fma: bool, limits: DeviceLimits, gates: int = 1,
                 proj_size: int = 0) -> RecurrenceConfig | None:
    """The one-program-per-group on-chip plan (S = 1), where it fits and does not spill. Gated cells hold
    G slices of W_hh ([next_pow2(P), next_pow2(H)] each) and, with a projection, W_hr."""
    P = proj_size or H
    block_h = max(MIN_DOT, triton.next_power_of_2(H))
    block_k = max(MIN_DOT, triton.next_power_of_2(P))
    proj_elems = block_k * block_h if proj_size else 0  # W_hr [P, H] padded
    aligned = H % 16 == 0 and P % 16 == 0
    if fma:
        # exact fp32 (and fp64) dots are FMA loops holding a whole K row in registers: beyond a 16 x 32
        # tile they spill (fp32 H=50 and H=128 did on sm_80/sm_90); G gates hold G such tiles
        if gates * block_b * max(block_h, block_k) > FMA_ON_CHIP_MAX_TILE:
            return None
    else:
        if (gates * block_h * block_k + proj_elems) * dtype.itemsize > ON_CHIP_MAX_BYTES:
            return None
        # H not a multiple of 16: loads go scalar and masks per element: wide TF32 tiles spilled (H=100)
        if dtype == torch.float32 and not aligned and max(block_h, block_k) > 64:
            return None
    # (unaligned H >= 128: the masked backward spilled at 4 warps on sm_86/sm_89)
    num_warps = 8 if (block_h >= 256 or block_b * block_h >= 32 * 128 or (fma and block_h >= 64)
                      or (not aligned and block_h >= 128)) else 4
    num_warps = gate_warps(block_b, block_h, gates, num_warps) if gates > 1 else num_warps
    if num_warps is None:
        return None
    # H = 256 in 16-bit: Triton's default 3-stage pipelining of the per-step loads adds ~40 KiB, which
    # pushed the backward past sm_80's 163 KiB
    num_stages = 1 if block_h >= 256 or gates > 1 else None

    def shared(stages):
        return onchip_shared_bytes(block_b, block_h, dtype.itemsize, stages, False, block_k, gates, proj_elems)
    if shared(num_stages) > limits.shared_per_block:
        num_stages = 1  # the backward's prefetch is what does not fit (TF32 H=128 on sm_86: 106,496 B)
    if shared(num_stages) > limits.shared_per_block:
        return None
    return RecurrenceConfig(block_b, block_h, True, num_warps, num_stages)


def _stream_block_k(dtype: torch.dtype, fma: bool, aligned: bool) -> int:
    """The K chunk of a streamed slice: FMA dots 16 wide; tensor cores `STREAMED_BLOCK_H`, halved at H
    not a multiple of 16 (the exchanged state's rows are unaligned there: wide chunks spilled)."""
    if fma:
        return MIN_DOT
    return STREAMED_BLOCK_H[dtype] if aligned else max(MIN_DOT, STREAMED_BLOCK_H[dtype] // 2)


def _split_candidates(H: int, B: int, dtype: torch.dtype, fma: bool, limits: DeviceLimits,
                      splits: list[int] | None = None, gates: int = 1,
                      proj_size: int = 0) -> list[RecurrenceConfig]:
    """Split plans (S > 1; S from `SPLIT_BLOCK_N`, or `splits`) that fit one program's shared memory and
    compile without spills, persistent where the grid is resident. Gated cells: G slices per program and
    G accumulators (`gate_warps`); streamed K chunks shrink so the G chunks (and their prefetch) stay the
    size of the Elman's. A projection adds each program's W_hr rows ([UP, H]) and the dot over H."""
    out = []
    itemsize = dtype.itemsize
    P = proj_size or H
    block_k_full = max(MIN_DOT, triton.next_power_of_2(P))
    block_kh = max(MIN_DOT, triton.next_power_of_2(H))  # the projection's K on chip
    aligned = H % 16 == 0 and P % 16 == 0
    if splits is None:
        splits = sorted({triton.cdiv(H, bn) for bn in SPLIT_BLOCK_N})
    for block_b in sorted({16, 32, _batch_tile(B), min(64, max(MIN_DOT, triton.next_power_of_2(B)))}):
        if block_b > max(MIN_DOT, triton.next_power_of_2(B)):
            continue
        tiles = triton.cdiv(B, block_b)
        for S in splits:
            if S < 2 or S > H:
                continue
            block_n = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(H, S)))
            block_p = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(P, S))) if proj_size else 0
            plans = []
            # on chip: the group's state [block_b, next_pow2(P)] is the dot's A operand; 8 warps from 8K
            # elements of it, at most 16K (32 x 1024 and 16 x 1024 at 4 warps spilled on sm_80/sm_86)
            a_elems = block_b * max(block_k_full, block_kh if proj_size else 0)
            # unaligned H: masked, scalar state loads; beyond K = 256 they spilled (fp16 H=300 on sm_86)
            if (not fma and max(block_k_full, block_kh if proj_size else 0) <= MAX_SPLIT_K and a_elems <= 16384
                    and block_n <= 128 and (aligned or block_k_full <= (64 if dtype == torch.float32 else 256))):
                warps = 8 if a_elems >= 8192 or block_n * block_k_full >= 16384 else 4  # 16 x 128 x 256: spilled
                if gates > 1 and (itemsize == 4 or not aligned or proj_size or gates * block_n * block_k_full >= 16384):
                    # at 4 warps: gated fp32 (TF32) 16 x 16 x 128 (254 registers, spilled on sm_90), the
                    # projected LSTM at H=50/P=20 (255), the LSTM's 16 x 16 x 256 (stack on sm_90)
                    warps = 8
                warps = gate_warps(block_b, block_n, gates, warps)
                if gates > 1 and a_elems >= 8192:  # four gates at 16 x 512 (bf16, sm_90) and 16 x 1024 spilled
                    warps = None  # inside the loop
                if gates > 1 and gates * block_n * block_k_full >= 32768:  # the LSTM 16 x 32 x 256, lengths: 8 B (sm_90)
                    warps = None
                if gates > 1 and itemsize == 4 and gates * block_k_full > 384:
                    warps = None  # TF32 LSTM 16 x 16 x 128: 255 registers and spills at 4 and 8 warps (sm_90)
                # the gated backward holds G dz tiles and the carried dc beside the G slices: at 4 warps the
                # fp16 LSTM 16 x 16 x 128 (S = 8) put 16 B on the stack (sm_86/89); 8 compiled clean (at K = 256
                # 4 warps compile clean, and 8 would cost the residency of S = 16 plans)
                backward_warps = 8 if gates > 1 and warps == 4 and block_k_full <= 128 else warps
                proj_elems = block_p * block_kh if proj_size else 0
                shared = onchip_shared_bytes(block_b, block_n, itemsize, 1, False, block_k_full, gates, proj_elems)
                if warps is not None and shared <= limits.shared_per_block:
                    plans.append((RecurrenceConfig(block_b, block_n, True, backward_warps, 1,
                                                   num_warps_forward=warps if backward_warps != warps else None,
                                                   split=S), shared, max(warps, backward_warps)))
            # streamed: FMA dots hold a K row per thread (16 x 16 tiles; 32 x 16 spilled 8 B); tensor-core tiles
            # up to 16 x 64 / 32 x 32 (32 x 64 and 16 x 128 spilled in the backward)
            # the backward holds chunk k and k + 1 of W in registers: 64 x 64 chunks spilled, 64 x 32 did not;
            # at unaligned H (masked scalar loads) 16 x 64 tiles spilled, 16 x 32 did not
            block_k = _stream_block_k(dtype, fma, aligned)
            while gates > 1 and block_k > MIN_DOT and gates * block_k * block_n * itemsize > 4096:
                block_k //= 2  # the G chunks (and their prefetch) the size of one 16-bit Elman chunk
            tile_ok = ((block_n == MIN_DOT and block_b == MIN_DOT) if fma
                       else gates * block_b * block_n <= 1024 * max(1, gates // 2)
                       and gates * block_k * block_n <= 2048 and (aligned or block_n <= 32))
            if tile_ok:
                shared = streamed_shared_bytes(block_b, block_n, block_k, itemsize, gates=gates)
                # gated fp32 (TF32 and exact FMA dots): at 4 warps values kept across the time loop went to
                # the stack (sm_80)
                warps = 8 if gates > 1 and itemsize == 4 else 4
                # the projected LSTM's backward (g exchanged, then dz) at 16 x 16 x 32 chunks put 8-16 B on the
                # stack (H=2048/P=320, sm_86/sm_90); 16-wide chunks compiled clean
                block_k_backward = MIN_DOT if proj_size and block_k > MIN_DOT else None
                if shared <= limits.shared_per_block:
                    plans.append((RecurrenceConfig(block_b, block_n, False, warps, 1, split=S, block_k=block_k,
                                                   block_k_backward=block_k_backward), shared, warps))
            for cfg, shared, warps in plans:
                capacity = programs_per_sm(limits, shared, warps) * limits.sm_count
                resident = S * tiles * 2 <= int(RESIDENT_FRACTION * capacity)
                out.append(replace(cfg, persistent=resident))
    return out


def select_config(hidden_size: int, batch_size: int, dtype: torch.dtype, allow_tf32: bool = False,
                  limits: DeviceLimits | None = None, split: int | None = None, cell: str | None = None,
                  proj_size: int | None = None) -> RecurrenceConfig:
    """The plan the forward and the backward recurrence use for this (H, B, dtype), for fp32 whether
    `tl.dot` may use TF32 tensor cores, on a device with `limits` (None: `DEFAULT_LIMITS`), with `split`
    programs per group where given and possible (`FUSED_BIRNN_SPLIT`), for the `cell` (nn.RNNBase's
    mode names, None: Elman; G = `gate_count(cell)` gate slices per program) and an LSTM's `proj_size`
    (None or 0: no projection; then the state h is P = proj_size wide and each program also owns UP =
    cdiv(P, S) of its units, `RecurrenceConfig.block_p`). The forward and the backward of one layer must
    be planned with the same arguments. Plans are sized for a bidirectional launch (D = 2); a
    unidirectional one uses half the programs."""
    limits = limits or DEFAULT_LIMITS
    H, B = hidden_size, batch_size
    gates = gate_count(cell)
    P = proj_size or 0
    if P and cell != "LSTM":
        raise ValueError(f"proj_size: only the LSTM cell has a projection, got cell={cell!r}")
    block_b = _batch_tile(B)
    fma = dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32)
    if limits.unbounded:  # the interpreter: one program per group holds everything, unless told
        S = max(1, min(split or 1, H))
        block_h = max(MIN_DOT, triton.next_power_of_2(triton.cdiv(H, S)))
        return RecurrenceConfig(block_b, block_h, True, split=S if S > 1 else None, single_chunk=S == 1)
    one = _one_program(H, block_b, dtype, fma, limits, gates, P)
    candidates = ([one] if one else []) + _split_candidates(H, B, dtype, fma, limits, None, gates, P)
    if split is not None:  # FUSED_BIRNN_SPLIT: that S wherever a plan with it fits
        forced = ([one] if one and split == 1 else []) + (
            _split_candidates(H, B, dtype, fma, limits, [split], gates, P) if split > 1 else [])
        candidates = forced or candidates
    if not candidates:  # nothing fits one program (cannot happen with MIN_DOT tiles; keep a safe plan)
        return RecurrenceConfig(MIN_DOT, MIN_DOT, False, 4, 1, block_k=MIN_DOT, persistent=False)
    return min(candidates, key=lambda c: estimate_step_us(c, H, B, dtype, allow_tf32, limits, 2, gates, P)["us"])
