"""The recurrences' matrix products against a program's slice of a weight matrix, held on chip as K chunks.

A program's slice (of `W_hh`, or of the projection's `W_hr`) is laid out by the launcher as dense chunks
(kernels/launch.py): chunk c is the rows [c*BK, (c+1)*BK) of the slice, `ROW` elements a row, zero-padded
past the real rows and columns, so every load here is unmasked and coalesced. The first `NR` chunks are
*resident*: loaded once before the time loop (`resident`), and Triton keeps a loop-invariant `tl.dot`
operand in shared memory for the whole loop (NOTES-triton 16). The remaining chunks, if any, are
*streamed*: read from global memory (L2) every step, chunk c + 1 while chunk c multiplies (the kernels
compile with `num_stages=1`: Triton's pipeliner would turn the volatile exchange loads into L1-allocating
`cp.async.ca`). NR = NK is a fully resident plan, 0 < NR < NK a partially resident one (the slice does
not fit the device's shared memory: the first chunks stay on chip), NR = 0 a streamed one: one code path.

Two products:

* `gather_product`: `acc += A @ W` with A [BLOCK_B, K] the group's exchanged state (or dz), read chunk by
  chunk from the exchange buffer (`exchange.load_exchanged`) as W's chunks come; the forward's gate
  product (K = P, N = G*BLOCK_N gate-major columns: one dot per chunk for every gate, the accumulator
  split into gates afterwards), the projection (K = H), the backward's dz gather (K = G*H) and its
  projection (K = P). `TWO` adds a second output over other columns of the same rows (the GRU's n gate:
  three gates are not a power of two, and padding them to four would spend a quarter of the resident
  shared memory on zeros).
* `scatter_product`: `partial[:, cols] = sum_g dz_g @ W_g[:, cols]` for every column chunk of the
  program's own rows, stored to the exchange buffer: the backward's partial sums of dh (kernels/backward.py).

Every load of a weight slice is in this file: the compile checks find them by their debug location
(`.loc`) in the PTX and prove that a fully resident plan loads none inside its time loop.
"""

import triton
import triton.language as tl

from .exchange import load_exchanged


@triton.jit
def resident(w_ptr, NR: tl.constexpr, BK: tl.constexpr, N: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr):
    """Chunks 0 .. NR-1 of the slice at `w_ptr` (chunk c: rows [c*BK, (c+1)*BK), `ROW` elements a row),
    columns [COL, COL + N) of each: a tuple of NR [BK, N] tiles, loaded once (before the time loop)."""
    offs_k = tl.arange(0, BK)
    tile = offs_k[:, None] * ROW + COL + tl.arange(0, N)[None, :]
    ws = ()
    for c in tl.static_range(NR):
        ws = ws + (tl.load(w_ptr + c * BK * ROW + tile),)
    return ws


@triton.jit
def streamed(w_ptr, c, n, BK: tl.constexpr, N: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr):
    """Chunk c of the slice (as `resident`), read now from global memory; zeros unless c < n."""
    offs_k = tl.arange(0, BK)
    tile = offs_k[:, None] * ROW + COL + tl.arange(0, N)[None, :]
    return tl.load(w_ptr + c * BK * ROW + tile, mask=(offs_k * 0 + c < n)[:, None], other=0.0)


@triton.jit
def gather_product(src, mask_b, KB, w_ptr, ws, acc, ws2, acc2,
                   NK: tl.constexpr, NKB: tl.constexpr, NR: tl.constexpr, BK: tl.constexpr, N: tl.constexpr,
                   ROW: tl.constexpr, N2: tl.constexpr, COL2: tl.constexpr, TWO: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """`acc += A @ W[:, :N]` (and, `TWO`, `acc2 += A @ W[:, COL2:COL2 + N2]`) over the NK chunks of the
    program's slice at `w_ptr`. A [BLOCK_B, K] is read from the exchange rows `src` (row b's element k at
    `src[b] + k`; rows outside `mask_b` read as 0) one [BLOCK_B, BK] chunk at a time, as K blocks of KB
    elements (the backward's dz: one block per gate), each in NKB chunks (columns past KB read as 0):
    chunk i is block i // NKB, elements (i % NKB)*BK .. of it. Chunks < NR come from the resident tuples
    `ws` (`ws2`), the others from global memory. Chunks are multiplied in order 0 .. NK-1 whatever the
    split, so every program reduces in the same order."""
    offs_k = tl.arange(0, BK)
    for i in tl.static_range(NR):
        ks = (i % NKB) * BK + offs_k
        a = load_exchanged(src + (i // NKB) * KB + ks[None, :], mask_b[:, None] & (ks < KB)[None, :])
        acc = tl.dot(a.to(ws[i].dtype), ws[i], acc=acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if TWO:
            acc2 = tl.dot(a.to(ws2[i].dtype), ws2[i], acc=acc2, input_precision=INPUT_PRECISION,
                          out_dtype=ACC_DTYPE)
    if NR < NK:  # the streamed chunks: i + 1 is in flight while i multiplies
        ks = (NR % NKB) * BK + offs_k
        a_next = load_exchanged(src + (NR // NKB) * KB + ks[None, :], mask_b[:, None] & (ks < KB)[None, :])
        w_next = streamed(w_ptr, NR, NK, BK, N, ROW, 0)
        w2_next = w_next
        if TWO:
            w2_next = streamed(w_ptr, NR, NK, BK, N2, ROW, COL2)
        for i in range(NR, NK):
            a = a_next
            w = w_next
            w2 = w2_next
            j = i + 1
            ks = (j % NKB) * BK + offs_k
            a_next = load_exchanged(src + (j // NKB) * KB + ks[None, :],
                                    mask_b[:, None] & ((ks < KB) & (offs_k * 0 + j < NK))[None, :])
            w_next = streamed(w_ptr, j, NK, BK, N, ROW, 0)
            if TWO:
                w2_next = streamed(w_ptr, j, NK, BK, N2, ROW, COL2)
            acc = tl.dot(a.to(w.dtype), w, acc=acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if TWO:
                acc2 = tl.dot(a.to(w2.dtype), w2, acc=acc2, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc, acc2


@triton.jit
def gate_tiles_dot(dz0, dz1, dz2, dz3, w0, w1, w2, w3, G: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """sum_g dz_g @ w_g over the G gates (tiles of gates >= G unused)."""
    acc = tl.dot(dz0.to(w0.dtype), w0, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if G > 1:
        acc = tl.dot(dz1.to(w1.dtype), w1, acc=acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc = tl.dot(dz2.to(w2.dtype), w2, acc=acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if G > 3:
        acc = tl.dot(dz3.to(w3.dtype), w3, acc=acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _streamed_gate_tiles(w_ptr, c, n, G: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """The G [BN, BC] tiles of column chunk c, read from global memory (zeros unless c < n)."""
    w0 = streamed(w_ptr, c * G, n * G, BN, BC, BC, 0)
    w1 = w0
    w2 = w0
    w3 = w0
    if G > 1:
        w1 = streamed(w_ptr, c * G + 1, n * G, BN, BC, BC, 0)
        w2 = streamed(w_ptr, c * G + 2, n * G, BN, BC, BC, 0)
    if G > 3:
        w3 = streamed(w_ptr, c * G + 3, n * G, BN, BC, BC, 0)
    return w0, w1, w2, w3


@triton.jit
def scatter_product(dst, mask_b, cols, w_ptr, ws, dz0, dz1, dz2, dz3,
                    NC: tl.constexpr, NR: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """For every column chunk c of the program's rows of W (G gate tiles [BN, BC] per chunk, chunk c's
    tile of gate g the (c*G + g)-th [BN, BC] tile of the slice): `sum_g dz_g @ W_g[:, c*BC:(c+1)*BC]`,
    stored to `dst + c*BC + j` (columns j < `cols` of each row in `mask_b`, in dst's dtype). Chunks < NR
    come from the resident tuple `ws` (NR*G tiles); the others are read from global memory, chunk c + 1
    while chunk c multiplies."""
    offs_c = tl.arange(0, BC)
    m = mask_b[:, None]
    for c in tl.static_range(NR):
        w0 = ws[c * G]
        w1 = w0
        w2 = w0
        w3 = w0
        if G > 1:
            w1 = ws[c * G + 1]
            w2 = ws[c * G + 2]
        if G > 3:
            w3 = ws[c * G + 3]
        acc = gate_tiles_dot(dz0, dz1, dz2, dz3, w0, w1, w2, w3, G, ACC_DTYPE, INPUT_PRECISION)
        js = c * BC + offs_c
        tl.store(dst + js[None, :], acc.to(dst.dtype.element_ty), mask=m & (js < cols)[None, :])
        # a fence for ptxas' scheduler: without it every chunk's operand reads from shared memory are
        # hoisted to the top (256 registers of fragments at 4 warps, spilled)
        tl.debug_barrier()
    if NR < NC:
        n0, n1, n2, n3 = _streamed_gate_tiles(w_ptr, NR, NC, G, BN, BC)
        for c in range(NR, NC):
            w0 = n0
            w1 = n1
            w2 = n2
            w3 = n3
            n0, n1, n2, n3 = _streamed_gate_tiles(w_ptr, c + 1, NC, G, BN, BC)
            acc = gate_tiles_dot(dz0, dz1, dz2, dz3, w0, w1, w2, w3, G, ACC_DTYPE, INPUT_PRECISION)
            js = c * BC + offs_c
            tl.store(dst + js[None, :], acc.to(dst.dtype.element_ty), mask=m & (js < cols)[None, :])


@triton.jit
def split_gates(acc, GA: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gate tiles [BLOCK_B, BLOCK_N] of a gate product's accumulator [BLOCK_B, GA*BLOCK_N] whose
    columns are gate-major (gate k's unit n at column k*BLOCK_N + n), GA in {1, 2, 4}; tiles past GA
    repeat the first."""
    if GA == 4:
        a = tl.permute(tl.reshape(acc, (BLOCK_B, 2, 2, BLOCK_N)), (0, 3, 1, 2))  # [b, n, k // 2, k % 2]
        even, odd = tl.split(a)
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
    elif GA == 2:
        g0, g1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_B, 2, BLOCK_N)), (0, 2, 1)))
        g2 = g0
        g3 = g0
    else:
        g0 = acc
        g1 = acc
        g2 = acc
        g3 = acc
    return g0, g1, g2, g3
