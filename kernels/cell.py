"""Pointwise cell functions shared by the forward and backward recurrences.

An Elman cell is `h = act(z)` with `z = x_proj + h_prev @ W_hh^T`, `act` in {tanh, relu}. The backward
needs `act'(z)`, which for both activations is a function of the output `h` alone, so the backward
recurrence reads the stored outputs instead of keeping the pre-activations.

GRU/LSTM cells will add their gate math here and reuse the recurrence skeletons.
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
def cell_backward(g, h, RELU: tl.constexpr):
    """dz of the program's units from the gradient g reaching their output h."""
    return g * activation_grad_from_output(h, RELU)
