"""Launch configurations of the recurrence kernels: a small explicit table keyed on (H, B, dtype).

Two ways to hold `W_hh` during the time loop:

* on chip (`w_on_chip=True`): one program loads its direction's whole `W_hh` (padded to
  `block_h x block_h`) once, before the loop; Triton places it in shared memory as the `tl.dot` operand.
  The hidden state stays in registers in fp32. Chosen while the padded matrix takes at most
  `ON_CHIP_MAX_BYTES` (fp16/bf16: H <= 128 ... 256 is measured by the compile checks, fp32: H <= 128).
* streamed (`w_on_chip=False`): every step walks `W_hh` in `block_h x block_h` tiles (from L2 on a GPU)
  and exchanges the hidden state through a small fp32 workspace owned by the program, with a CTA barrier
  between steps. Used above the on-chip limit; any H works.

Plans are device-aware: `select_config` takes the device's `DeviceLimits` (shared memory per block, SM
count, registers), so an on-chip configuration is only returned where it fits the block's shared memory
(sm_86/sm_89/sm_120 allow 101,376 B, sm_80 166,912 B, sm_90 232,448 B).

`tests/test_compile.py` compiles every configuration this table can return at representative sizes for
sm_80, sm_86, sm_89 and sm_90, each planned with its own limits, and checks shared memory, spills and
tensor-core use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, and SM count,
# per compute capability; the launchers read the real device instead (`device_limits`).
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# Padded W_hh bytes allowed on chip. fp16 H=256 (128 KiB of operand, ~139 KiB with Triton's scratch) fits
# both an A100 (163 KiB per block) and an H100 (227 KiB); fp32 H=256 (256 KiB) fits neither.
ON_CHIP_MAX_BYTES = 128 * 1024
# Tile edge of the streamed path on tensor cores: W tile and hidden-state tile are block_h wide.
STREAMED_BLOCK_H = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32, torch.float64: 32}  # H % 16 == 0
MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on a GPU
MAX_PROGRAMS_PER_DIRECTION = 64  # above this, grow the batch tile instead of the grid
FMA_ON_CHIP_MAX_TILE = 16 * 32  # block_b * block_h limit of the on-chip path without tensor cores


@dataclass(frozen=True)
class DeviceLimits:
    """What a plan must fit: the limits of the device (or compile target) a launch runs on.

    Attributes:
        shared_per_block: shared memory one program may use, bytes (the opt-in maximum).
        sm_count: streaming multiprocessors.
        registers_per_sm: 32-bit registers per SM.
        shared_per_sm: shared memory per SM, bytes.
        name: what the limits describe (device name or `sm_XX`).
    """

    shared_per_block: int
    sm_count: int = 132
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472
    name: str = ""

    @staticmethod
    def for_arch(arch: int, sm_count: int | None = None) -> "DeviceLimits":
        """The limits of a compute capability (e.g. 86), with a typical SM count for it."""
        if arch not in SHARED_PER_BLOCK:
            raise ValueError(f"arch: no shared-memory limit known for sm_{arch} ({sorted(SHARED_PER_BLOCK)})")
        typical_sms = {80: 108, 86: 84, 87: 16, 89: 128, 90: 132, 100: 148, 120: 170}
        per_block = SHARED_PER_BLOCK[arch]
        return DeviceLimits(per_block, sm_count or typical_sms[arch], 65536, per_block + 1024, f"sm_{arch}")


# the plan's default when no device is given (the interpreter, or a caller that does not say): an A100
DEFAULT_LIMITS = DeviceLimits.for_arch(80)


@lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    arch = p.major * 10 + p.minor
    fallback = SHARED_PER_BLOCK.get(arch, SHARED_PER_BLOCK[80] if p.major < 9 else SHARED_PER_BLOCK[90])
    per_block = int(getattr(p, "shared_memory_per_block_optin", 0) or fallback)
    return DeviceLimits(per_block, int(p.multi_processor_count),
                        int(getattr(p, "regs_per_multiprocessor", 0) or 65536),
                        int(getattr(p, "shared_memory_per_multiprocessor", 0) or per_block + 1024),
                        f"{p.name} (sm_{arch})")


def device_limits(device: torch.device | None) -> DeviceLimits:
    """The limits of `device`: read from the CUDA device's properties (cached), else `DEFAULT_LIMITS`."""
    if device is not None and device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_LIMITS


def onchip_shared_bytes(block_b: int, block_h: int, itemsize: int, num_stages: int | None,
                        forward: bool) -> int:
    """Estimated shared memory of the on-chip kernels: W_hh (block_h^2), the state as the dot's A
    operand (block_b x block_h), and for the backward the per-step loads (out, grad_out) the pipeliner
    prefetches num_stages - 1 steps ahead. Matches Triton 3.6/3.9 exactly on every size the compile checks
    cover (e.g. fp16 H=256 139,264 B; TF32 backward H=128 106,496 B at 3 stages)."""
    stages = 3 if num_stages is None else num_stages
    tile = block_b * block_h * itemsize
    prefetched = 0 if forward else 2 * (stages - 1) * tile
    return block_h * block_h * itemsize + tile + prefetched


@dataclass(frozen=True)
class RecurrenceConfig:
    """How one recurrence launch tiles its work.

    Attributes:
        block_b: batch rows per program (the `M` of every `tl.dot`, >= 16).
        block_h: on chip: H padded to a power of two (>= 16); streamed: the tile edge.
        w_on_chip: whether `W_hh` is loaded once and kept on chip (else streamed every step).
        num_warps: warps per program.
        num_warps_forward: the forward kernel's warps where they differ from the backward's.
    """

    block_b: int
    block_h: int
    w_on_chip: bool
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default (3 on NVIDIA)
    num_warps_forward: int | None = None

    def warps(self, forward: bool) -> int:
        """Warps of the forward or the backward kernel."""
        return self.num_warps_forward if forward and self.num_warps_forward else self.num_warps

    def num_batch_tiles(self, batch_size: int) -> int:
        return triton.cdiv(batch_size, self.block_b)


def select_config(hidden_size: int, batch_size: int, dtype: torch.dtype,
                  allow_tf32: bool = False, limits: DeviceLimits | None = None) -> RecurrenceConfig:
    """The configuration the forward and the backward recurrence use for this (H, B, dtype), for fp32
    whether `tl.dot` may use TF32 tensor cores, on a device with `limits` (None: `DEFAULT_LIMITS`)."""
    limits = limits or DEFAULT_LIMITS
    block_h_full = max(MIN_DOT, triton.next_power_of_2(hidden_size))
    block_b = MIN_DOT
    while block_b < 64 and triton.cdiv(batch_size, block_b) > MAX_PROGRAMS_PER_DIRECTION:
        block_b *= 2
    # exact fp32 (and fp64) dots are FMA loops holding a whole K row in registers: beyond a 16 x 32
    # tile they spill (fp32 H=50 and H=128 did on sm_80/sm_90), so they stream sooner
    fma = dtype == torch.float64 or (dtype == torch.float32 and not allow_tf32)
    # H not a multiple of 16: rows and the reverse half's columns are unaligned, loads go scalar and
    # masks per element: wide tiles spilled (fp16 H=300 with 64-wide streamed tiles, TF32 H=100 on chip)
    aligned = hidden_size % 16 == 0
    if fma:
        on_chip = block_b * block_h_full <= FMA_ON_CHIP_MAX_TILE
    else:
        on_chip = block_h_full * block_h_full * dtype.itemsize <= ON_CHIP_MAX_BYTES
        if dtype == torch.float32 and not aligned:
            on_chip = on_chip and block_h_full <= 64
    if on_chip:
        # the full-width hidden state and accumulator live in registers: more warps for wide tiles
        num_warps = 8 if (block_h_full >= 256 or block_b * block_h_full >= 32 * 128
                          or (fma and block_h_full >= 64)) else 4
        # H = 256 in 16-bit: Triton's default 3-stage pipelining of the per-step loads adds ~40 KiB,
        # which pushed the backward past sm_80's 163 KiB
        num_stages = 1 if block_h_full >= 256 else None
        itemsize = dtype.itemsize
        if onchip_shared_bytes(block_b, block_h_full, itemsize, num_stages, False) > limits.shared_per_block:
            num_stages = 1  # the backward's prefetch is what does not fit (TF32 H=128 on sm_86: 106,496 B)
        if onchip_shared_bytes(block_b, block_h_full, itemsize, num_stages, False) <= limits.shared_per_block:
            return RecurrenceConfig(block_b, block_h_full, True, num_warps, num_stages)
    # streamed tiles: FMA dots 16 wide (32 spilled a few bytes at odd H with lengths on sm_80); tensor
    # cores STREAMED_BLOCK_H, halved (at least 16) for unaligned H
    if fma:
        block_h = MIN_DOT
    else:
        block_h = STREAMED_BLOCK_H[dtype] if aligned else max(MIN_DOT, STREAMED_BLOCK_H[dtype] // 2)
    # 16-bit and TF32 streamed forwards spill a few bytes at 4 warps with triton 3.6 (128-register cap);
    # the backward spills at 8: each gets its own
    return RecurrenceConfig(block_b, block_h, False, 4, num_warps_forward=4 if fma else 8)
