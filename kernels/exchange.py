"""The one load of the exchange buffer (kernels/sync.py), alone in this file so that the compile checks can
find every exchange load in the PTX by its debug location (`.loc` of this file) and prove it bypasses L1.
"""

import triton
import triton.language as tl


@triton.jit
def load_exchanged(ptrs, mask):
    """Read another program's published state: volatile (`ld.volatile.global`), so never served from a
    stale L1 line (L1 is not coherent across SMs). The kernels that call it compile with num_stages=1:
    Triton's pipeliner would turn it into an L1-allocating `cp.async.ca`."""
    return tl.load(ptrs, mask=mask, other=0.0, volatile=True)
