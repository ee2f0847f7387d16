"""The per-step latency floor of a persistent recurrence on this GPU.

A recurrence kernel that keeps its state on chip still pays, every time step, for: reading that step's
input from global memory, one block-wide exchange of the state (every hidden unit depends on all of
them: a reduction through shared memory with barriers), a little arithmetic, and a store. This kernel does
exactly that and nothing else, for T steps, one program per direction (grid (2,)): its time divided by T is
a floor that no step of `birnn_fwd_*_kernel` can go below at this program shape, and the ratio of our time
per sequential step to it says how much of a step is matrix work and how much is latency.

Used only on CUDA (never through the interpreter). Import-time decoration is harmless: the module is
imported by the CUDA path only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOOR_BLOCK = 128
FLOOR_WARPS = 4


@triton.jit(do_not_specialize=["T"])
def step_floor_kernel(x_ptr, out_ptr, T, BLOCK: tl.constexpr):
    """Program d (a direction) walks t = 0..T-1 (d = 0) or T-1..0 (d = 1) over a `[2, T, BLOCK]` fp32
    buffer: `h = relu(x_t + 0.5 * sum(h))`, stored at `out[d, t]`. The sum makes each step depend on all
    lanes of the previous one, as a mat-vec does."""
    d = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    base = d.to(tl.int64) * T * BLOCK
    h = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, T):
        t = (s + d * (T - 1 - 2 * s)).to(tl.int64)
        x = tl.load(x_ptr + base + t * BLOCK + offs)
        h = tl.maximum(x + 0.5 * tl.sum(h, axis=0), 0.0)
        tl.store(out_ptr + base + t * BLOCK + offs, h)


def floor_fn(seq_len: int, device: torch.device | str = "cuda"):
    """A callable launching the floor kernel for `seq_len` steps (buffers allocated once)."""
    x = torch.randn(2, seq_len, FLOOR_BLOCK, device=device) * 1e-3
    out = torch.empty_like(x)

    def run():
        step_floor_kernel[(2,)](x, out, seq_len, BLOCK=FLOOR_BLOCK, num_warps=FLOOR_WARPS)

    return run
