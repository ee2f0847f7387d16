"""Cross-program exchange of the recurrent state: loads that bypass L1, and the per-group step barrier.

A split recurrence divides the hidden units of one group (a direction and a batch tile) among SPLIT
cooperating programs (CTAs). Each step every program publishes its slice of the new state (forward: h,
backward: dz) to an exchange buffer in global memory, meets the others at the group's barrier, and reads
the group's whole state back. On a GPU that needs (`../NOTES-triton.md` 8c):

* a release arrive and an acquire wait at GPU scope: `group_barrier` arrives with an `acq_rel` atomic
  add on the group's counter and polls it with `acquire` atomics; a CTA barrier (`bar.sync`) before the
  arrive orders every thread's stores of the step before it, and one after the wait orders the
  acquiring thread's view before every thread's loads (the pattern of a cooperative grid sync);
* loads of the exchange buffer that cannot hit a stale L1 line: `exchange.load_exchanged` is a volatile load
  (`ld.volatile.global`, never cached in the non-coherent L1, and never turned into an L1-allocating
  `cp.async.ca` by the pipeliner). `tests/test_compile.py` checks both in the PTX of every split
  configuration.

The counter of a group only grows: after its c-th step of a launch every program waits until the
counter reaches `SPLIT * c`. The launcher zeroes the counters before each launch on the launch's stream
(a device memset, so CUDA-graph capture works and no host sync is needed).

Never a hang: on a GPU a persistent split launch is a cooperative launch (`launch_cooperative_grid`,
kernels/launch.py), so CUDA starts it only with every program of the grid resident at once, and the plan
sizes the grid to the device (kernels/config.py); every wait is bounded by `max_spins` polls all the same
(a refused launch runs per step; a program could still be held up by something the guarantee does not
cover). A program whose wait runs
out adds `ABORT_COUNT` to the counter (every other waiter of the group then returns at once, and a program that
arrives later sees it at its first wait), sets bit `ERR_BARRIER_TIMEOUT` of the error flag, and from then
on every program of the group writes NaN for all its remaining outputs (kernels/launch.py raises the
RuntimeError).
"""

import triton
import triton.language as tl

from .exchange import load_exchanged  # noqa: F401  (the exchange loads live in their own file)

ABORT_COUNT = 1 << 30  # added to a group's counter when one of its programs gives up waiting
ERR_BARRIER_TIMEOUT = 1  # error-flag bit: a program waited past max_spins at a step barrier
ABORT = tl.constexpr(ABORT_COUNT)
_ERR_TIMEOUT = tl.constexpr(ERR_BARRIER_TIMEOUT)
MAX_SPINS = 1 << 22  # polls of a barrier wait before it gives up: ~1-4 s on an H100 (estimate, ~0.3-1 us/poll)


@triton.jit
def group_barrier(bar_ptr, target, max_spins, err_ptr, aborted):
    """Arrive at the group's counter `bar_ptr` (release) and wait (acquire) until it reaches `target`,
    at most `max_spins` polls. Returns the new abort state (int32 0/1): 1 when this or another program
    of the group gave up, or `aborted` already was 1 (then nobody waits any more)."""
    tl.debug_barrier()  # all threads' stores of this step come before the release
    cnt = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") + 1
    spins = 0
    while (cnt < target) & (spins < max_spins) & (aborted == 0):
        cnt = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    timed_out = (cnt < target) & (aborted == 0)
    if timed_out:
        tl.atomic_add(bar_ptr, ABORT, sem="release", scope="gpu")  # release the group's other waiters
        tl.atomic_or(err_ptr, _ERR_TIMEOUT, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # the acquiring thread's view before every thread's loads of the next step
    return (aborted | timed_out.to(tl.int32) | (cnt >= ABORT).to(tl.int32)).to(tl.int32)
