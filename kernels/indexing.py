"""Time indexing shared by the recurrences: which time step a row reads at a processing step.

A program walks `n_steps` = the longest length among its rows (T without lengths). At processing step s
direction 0 is at time t = s and direction 1 at t = n_steps - 1 - s: one scalar time for the whole tile,
so pointers stay scalar-offset. A row takes part where t < its own length: in the forward direction it
stops after its last valid step; in the reverse direction it waits (state untouched) until t reaches
its own last valid step and starts there, which is exactly PyTorch's reverse recurrence over the valid
prefix. The flip back into time order is only an index: the state of step s is stored at time t.
"""

import triton
import triton.language as tl


@triton.jit
def sequence_lengths(lengths_ptr, offs_b, B, T, HAS_LENGTHS: tl.constexpr):
    """Valid length of each row in `offs_b` (int64): `lengths[b]`, or T without lengths; 0 past B."""
    if HAS_LENGTHS:
        return tl.load(lengths_ptr + offs_b, mask=offs_b < B, other=0).to(tl.int64)
    else:
        return tl.where(offs_b < B, T, 0).to(tl.int64)


@triton.jit
def step_time(s, direction, n_steps, seq_len):
    """The time index (scalar, int64) of processing step s, and which rows are active there."""
    t = (s + direction * (n_steps - 1 - 2 * s)).to(tl.int64)
    return t, t < seq_len
