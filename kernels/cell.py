"""Pointwise cell functions shared by the forward and backward recurrences.

An Elman cell is `h = act(z)` with `z = x_proj + h_prev @ W_hh^T`, `act` in {tanh, relu}. The backward
needs `act'(z)`, which for both activations is a function of the output `h` alone, so the backward
recurrence reads the stored outputs instead of keeping the pre-activations.

Gated cells (one recurrence skeleton for all, kernels/forward.py; G dots per step, one per gate):

* LSTM (`lstm_cell_forward`): gates i, f, g, o (sigmoid, sigmoid, tanh, sigmoid), `c' = f*c + i*g`,
  `h' = o * tanh(c')` (then `@ W_hr^T` with a projection, done by the skeleton: it mixes all units).
  A program owns all four gates and c of its hidden units, so c never leaves its registers.
* GRU (`gru_cell_forward`): r, z = sigmoid, `n = tanh(x_n + r * (W_hn h + b_hn))`, `h' = n + z*(h - n)`.
  The program needs h_prev of its own units only (it owns them).

Every helper works elementwise on [BLOCK_B, BLOCK_N] tiles in the accumulation dtype (fp32, fp64 for
fp64). Sigmoid and tanh are exp-based (the interpreter has no libdevice mapping) and never overflow.

Verified: through the recurrences only, under TRITON_INTERPRET=1 against fused_birnn.reference in float64
and torch_backend (forward: tests/test_kernels_gated.py; backward: tests/test_kernels_gated_backward.py,
tests/test_kernels.py), and compiled for sm_80/86/89/90 inside the kernels (tests/test_compile.py).
"""

import triton
import triton.language as tl


@triton.jit
def tanh(z):
    # exp-based so that it runs in the interpreter too (libdevice.tanh has no interpreter mapping).
    # e = exp(-2|z|) lies in (0, 1]: no overflow for any z.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def activation(z, RELU: tl.constexpr):
    if RELU:
        return tl.maximum(z, 0.0)
    else:
        return tanh(z)


@triton.jit
def activation_grad_from_output(h, RELU: tl.constexpr):
    """d act(z) / dz expressed through h = act(z): relu -> [h > 0], tanh -> 1 - h^2."""
    if RELU:
        return tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    else:
        return 1.0 - h * h


# The cell as the recurrence skeletons (kernels/forward.py, kernels/backward.py) call it. A program owns
# all of a cell's state for its hidden units (an LSTM's c, a GRU's reset gate would stay local to it):
# only h (forward) and dz (backward) cross programs.
@triton.jit
def cell_forward(z, RELU: tl.constexpr):
    """The new state of the program's units from their pre-activation z = x_proj + h_prev @ W_hh^T."""
    return activation(z, RELU)


@triton.jit
def sigmoid(z):
    # exp of a non-positive number only: no overflow for any z (as `tanh` above)
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def lstm_cell_forward(z_i, z_f, z_g, z_o, c):
    """One LSTM step of the program's units from the gates' pre-activations (x_proj + h_prev @ W_hh^T,
    gate order i, f, g, o as nn.LSTM's rows) and the previous cell state c:
    `c' = f*c + i*g`, `m = o * tanh(c')` (h itself, or what the projection multiplies by W_hr^T).
    Returns the activated gates (what the backward reads), c' and m."""
    i = sigmoid(z_i)
    f = sigmoid(z_f)
    g = tanh(z_g)
    o = sigmoid(z_o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def gru_cell_forward(z_r, z_z, hn, x_n, h):
    """One GRU step of the program's units: z_r, z_z the pre-activations of the reset and update gates
    (x_proj + h_prev @ W_h{r,z}^T, b_hr/b_hz folded into x_proj), hn = h_prev @ W_hn^T + b_hn (b_hn stays
    inside r * (...): nn.GRU's formula), x_n the input side of n, h the previous state of these units:
    `n = tanh(x_n + r * hn)`, `h' = (1 - z) * n + z * h` written as `n + z * (h - n)`.
    Returns r, z, n (what the backward reads, with hn) and h'."""
    r = sigmoid(z_r)
    z = sigmoid(z_z)
    n = tanh(x_n + r * hn)
    return r, z, n, n + z * (h - n)


@triton.jit
def cell_backward(g, h, RELU: tl.constexpr):
    """dz of the program's units from the gradient g reaching their output h."""
    return g * activation_grad_from_output(h, RELU)


# Backward of the gated cells (kernels/backward.py). Inputs are the saved activations (torch_backend's
# `saved` layout), the gradient reaching the state and what the program carries; `active` [BLOCK_B, 1]
# selects the rows that ran this step: an inactive row's saved gates are garbage (never multiplied into
# a result, `where`) and its carried state passes through unchanged. 1 - x is written as -x + 1.
@triton.jit
def lstm_cell_backward(dm, dc, i, f, g, o, c, c_prev, active):
    """One LSTM step backwards for the program's units. dm: gradient reaching m = o * tanh(c) (h itself,
    or g @ W_hr with a projection); dc: gradient reaching c from the later steps (dL/dc_s through
    c_{s+1} = f_{s+1} c_s + ..., or grad_c_n). Returns the pre-activation gradients of i, f, g, o and the
    carry to c_{s-1}: `dc_s = dc + dm * o * (1 - tanh(c)^2)`, `dz = [dc_s * g*i(1-i), dc_s * c_prev*f(1-f),
    dc_s * i*(1-g^2), dm * tanh(c)*o(1-o)]`, `dc_{s-1} = dc_s * f`."""
    tc = tanh(c)
    dc_s = dc + dm * (o * (1.0 - tc * tc))
    d_i = dc_s * (g * (i * (1.0 - i)))
    d_f = dc_s * (c_prev * (f * (1.0 - f)))
    d_g = dc_s * (i * (1.0 - g * g))
    d_o = dm * (tc * (o * (1.0 - o)))
    return (tl.where(active, d_i, 0.0), tl.where(active, d_f, 0.0), tl.where(active, d_g, 0.0),
            tl.where(active, d_o, 0.0), tl.where(active, dc_s * f, dc))


@triton.jit
def gru_cell_backward(g, r, z, hn, n, h_prev, active):
    """One GRU step backwards for the program's units; g: gradient reaching h_s = n + z * (h_{s-1} - n),
    hn = W_hn h_{s-1} + b_hn, h_prev = h_{s-1}. Returns the pre-activation gradients of r and z, of n's
    pre-activation on the input side `dn = g * (1-z)(1-n^2)`, of hn (the hidden side's n block,
    `dn * r`), and the direct carry to h_{s-1}, `g * z` (0 for inactive rows: the skeleton keeps their
    gradient as it is)."""
    dn = g * ((1.0 - z) * (1.0 - n * n))
    d_r = dn * (hn * (r * (1.0 - r)))
    d_z = g * ((h_prev - n) * (z * (1.0 - z)))
    return (tl.where(active, d_r, 0.0), tl.where(active, d_z, 0.0), tl.where(active, dn, 0.0),
            tl.where(active, dn * r, 0.0), tl.where(active, g * z, 0.0))
