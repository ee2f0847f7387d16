"""The pure-PyTorch recurrence of the three cells: same contract as the Triton kernels, any device and dtype.

It is a product path (CPU without the interpreter, float64 on CUDA, bf16 on CPU), not a toy:

* one recurrence skeleton (`recurrence_forward`, `recurrence_backward`) serves every cell; the cell is a
  parameter (`cell=`, nn.RNNBase's mode names `'RNN_TANH'`, `'RNN_RELU'`, `'LSTM'`, `'GRU'`) selecting a
  small class with its per-step pointwise math and what it saves (`_ElmanForward`, `_LSTMForward`, ...);
* both directions advance together: one `baddbmm` over a direction batch `[D, B, P] @ [D, P, G*H]` per
  step plus the cell's in-place pointwise ops, into buffers laid out in *processing order* `[T, D, B, *]`
  (step s of direction 1 is time T-1-s), so every step reads and writes contiguous slices;
* the backward is hand-written BPTT with no autograd: every pointwise factor that does not depend on the
  incoming gradient is computed for all steps at once before the loop, so a step is the cell's few
  products with the gradient and `g_prev += dz @ W_hh`; weight gradients are left to the caller's matrix
  products after the loop, as with the kernels.

Buffers (G gates: 1 Elman, 4 LSTM, 3 GRU; H hidden size; P the recurrent state's width, `proj_size` for a
projected LSTM else H; D directions; all in x_proj's dtype):

    x_proj [T, B, D*G*H]   x @ [W_ih_0; W_ih_1]^T + biases: direction d's gate k (nn's row order: i, f, g, o
                           / r, z, n) at columns d*G*H + k*H + j. Folded biases: Elman and LSTM b_ih + b_hh;
                           GRU b_ih + [b_hr, b_hz, 0] (b_hn sits inside r * (...) and is passed apart).
    w_hh   [D, G*H, P]     weight_hh of each direction, nn's layout.
    w_hr   [D, P, H]       LSTM projection weight_hr (optional).      b_hn [D, H]  GRU (optional).
    h0, h_n [D, B, P]      c0, c_n [D, B, H] (LSTM).                  out [T, B, D*P], time order.
    saved  [T, D*B*S*H]    what the gated cells keep for the backward (below); row s is processing step s.

What the forward saves, and why (per time step, batch row and direction; the caller keeps x, out, h0, c0
and the weights anyway, so those are not counted):

* Elman: nothing: act'(z) is a function of the output (1 - h^2, or h > 0).
* LSTM, S = 5: the four post-activation gates i, f, g, o (`[D, B, 4H]`) followed by the cell state c_s
  (`[D, B, H]`). c_{s-1} is the previous row's (c0 for the first), tanh(c_s) and, with a projection,
  m_s = o * tanh(c_s) (for dW_hr) are recomputed in the backward for all steps at once, off the
  sequential loop. PyTorch's fused CUDA cell keeps the same (4H gates + c), haste the gates, c and h
  (`shared/research/lstm-gru.md` §2.3-2.4, §2.7).
* GRU, S = 4: r, z, W_hn h + b_hn (`[D, B, 3H]`, the baddbmm's own output) followed by n (`[D, B, H]`);
  h_{s-1} comes from `out` and h0. haste keeps the same 4H; PyTorch's fused CUDA cell keeps 5H (h too).
* Not recomputing: rebuilding the gates in the backward needs x_proj again (G*H, as large as what is
  saved, or a second input GEMM) plus one more `h @ W_hh^T` per step on the backward's sequential path.

Against cuDNN's reserve space (what its backward reads; it also keeps the output y, as we keep `out`): no
formula is documented (`cudnnGetRNNTempSpaceSizes` returns a size per shape), so there is no measured
comparison yet; `tests/test_torch_cells.py::test_saved_vs_cudnn_reserve` (cuda) reads the reserve that
`torch._cudnn_rnn` returns and asserts ours is no larger, and has not run on a GPU. What is known: every
implementation read keeps at least the activated gates and c, and cuDNN cannot give an exact LSTM backward
from less than 5H per element without recomputing (an inference, not a measurement). The one public
measurement found, pytorch/pytorch#2895 (cuDNN of 2017, P100, a shape the thread does not state), has
cuDNN's GRU reserve at 864,000,000 bytes against 736,000,000 for LSTM, 1.17x, where ours is 4/5 = 0.8x:
if its LSTM reserve is at least our 5H, its GRU reserve is at least 5.9H against our 4H.

Lengths (`lengths [B]`): as for the Elman cell and the kernels, row b is active at processing step s iff
that step's time is below lengths[b] (`activity_mask`); an inactive row keeps its state (h and c), its
output is 0, and no gradient reaches its gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

CELLS = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")  # nn.RNNBase's mode names
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_SAVED_WIDTH = {"LSTM": 5, "GRU": 4}  # S: saved values per hidden unit (see the module docstring)


def cell_mode(cell: str | None = None, relu: bool = False) -> str:
    """The cell's mode name: `cell` itself, or for `cell=None` the Elman cell that `relu` names (the RNN
    functions' original signature)."""
    if cell is None:
        return "RNN_RELU" if relu else "RNN_TANH"
    if cell not in _GATES:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    if relu and cell != "RNN_RELU":
        raise ValueError(f"relu=True goes only with cell=None or 'RNN_RELU', got cell={cell!r}")
    return cell


def gate_count(cell: str) -> int:
    """G: rows of weight_ih / weight_hh per hidden unit (1, 4 or 3)."""
    return _GATES[cell_mode(cell)]


def saved_shape(cell: str, T: int, B: int, D: int, H: int) -> tuple[int, int] | None:
    """Shape of the `saved` tensor `recurrence_forward` returns for a gated cell (None for Elman), e.g. for
    a custom op's fake implementation."""
    width = _SAVED_WIDTH.get(cell_mode(cell))
    return None if width is None else (T, D * B * width * H)


def to_processing_order(x: Tensor, num_directions: int) -> Tensor:
    """`[T, B, D*W]` time layout -> a new contiguous `[T, D, B, W]`, direction 1 reversed in time."""
    T, B, DW = x.shape
    v = x.unflatten(-1, (num_directions, DW // num_directions)).transpose(1, 2)  # [T, D, B, W] view
    if num_directions == 1:
        return v.clone(memory_format=torch.contiguous_format)
    return torch.stack((v[:, 0], v[:, 1].flip(0)), 1)


def copy_to_processing_order(dst: Tensor, x: Tensor) -> Tensor:
    """Copy `x` (time layout, `[T, B, D*W]` or a `[T, B, D, W]` view) into the `[T, D, B, W]` view `dst`
    (any strides): direction 1 reversed in time. Only direction 1 passes through a temporary (flip
    copies)."""
    D = dst.shape[1]
    v = x if x.dim() == 4 else x.unflatten(-1, (D, x.shape[-1] // D))  # [T, B, D, W]
    dst[:, 0].copy_(v[:, :, 0])
    if D == 2:
        dst[:, 1].copy_(v[:, :, 1].flip(0))
    return dst


def to_time_order(p: Tensor) -> Tensor:
    """`[T, D, B, W]` processing layout -> contiguous `[T, B, D*W]` (a view of p if D = 1 and p is
    contiguous, else a new tensor)."""
    T, D, B, W = p.shape
    if D == 1 and p.is_contiguous():
        return p.view(T, B, W)
    if D == 1:
        return p.reshape(T, B, W).clone(memory_format=torch.contiguous_format)
    return torch.stack((p[:, 0], p[:, 1].flip(0)), 2).view(T, B, D * W)


def activity_mask(lengths: Tensor, T: int, num_directions: int, dtype: torch.dtype) -> Tensor:
    """`[T, D, B, 1]` 1/0 mask in processing order: whether row b is active at step s of direction d.

    As in the kernels (kernels/indexing.py): step s is time s forward and T-1-s reverse for every row;
    a row is active where that time is below its length, so a reverse row waits, state untouched,
    until it reaches its own last valid step."""
    steps = torch.arange(T, device=lengths.device)
    times = torch.stack([steps, T - 1 - steps], 1)[:, :num_directions]  # [T, D]
    return (times[:, :, None] < lengths[None, None, :]).to(dtype).unsqueeze(-1)


# ------------------------------------------------------------------------------------------------ forward

def recurrence_forward(
    x_proj: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor | None = None,
    w_hr: Tensor | None = None,
    b_hn: Tensor | None = None,
    *,
    relu: bool = False,
    cell: str | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The recurrence of one layer, all directions, for any cell (buffers in the module docstring).

    Args:
        x_proj: `[T, B, D*G*H]` input projection, foldable biases included.
        w_hh: `[D, G*H, P]`.
        h0: `[D, B, P]`.
        c0: `[D, B, H]`, LSTM only (required there).
        w_hr: `[D, P, H]`, LSTM with a projection only.
        b_hn: `[D, H]`, GRU with biases only.
        relu: with `cell=None`: the Elman cell with ReLU instead of tanh.
        cell: one of `CELLS`; None is the Elman cell `relu` names.
        lengths: optional `[B]` valid lengths (on x_proj's device, values in [1, T]): row b runs its first
            lengths[b] steps, the reverse direction from lengths[b] - 1; padded steps of `out` are 0.

    Returns:
        Elman `(out, h_n)`; LSTM `(out, h_n, c_n, saved)`; GRU `(out, h_n, saved)`.
    """
    mode = cell_mode(cell, relu)
    check_cell_arguments(mode, c0=c0, w_hr=w_hr, b_hn=b_hn)
    T = x_proj.shape[0]
    D = w_hh.shape[0]
    if mode == "LSTM":
        run = _LSTMForward(x_proj, w_hh, h0, c0, w_hr)
    elif mode == "GRU":
        run = _GRUForward(x_proj, w_hh, h0, b_hn)
    else:
        run = _ElmanForward(x_proj, w_hh, h0, mode == "RNN_RELU")
    active = None if lengths is None else activity_mask(lengths, T, D, x_proj.dtype).bool()
    state = run.initial
    # per-step views made once (unbind): indexing inside the loop costs more than a small step's math
    for s, new in enumerate(zip(*(b.unbind(0) for b in run.states))):
        run.step(s, state, new)
        if active is not None:  # inactive rows keep their state
            for new_part, old_part in zip(new, state):
                torch.where(active[s], new_part, old_part, out=new_part)
        state = new
    hs = run.states[0]
    out = to_time_order(hs if active is None else hs * active)
    return (out, *(part.clone() for part in state), *run.saved)


class _ElmanForward:
    """`h_s = act(x_s + h_{s-1} @ W_hh^T)`; saves nothing."""

    def __init__(self, x_proj: Tensor, w_hh: Tensor, h0: Tensor, relu: bool):
        D = w_hh.shape[0]
        xs = to_processing_order(x_proj, D) if D == 2 else x_proj.unsqueeze(1)  # read only
        self.xs = xs.unbind(0)
        self.w_t = w_hh.transpose(1, 2)
        self.act_ = torch.relu_ if relu else torch.tanh_
        self.initial = (h0,)
        self.states = (xs.new_empty((xs.shape[0],) + h0.shape),)
        self.saved = ()

    def step(self, s: int, state: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> None:
        torch.baddbmm(self.xs[s], state[0], self.w_t, out=new[0])
        self.act_(new[0])


class _LSTMForward:
    """`[i, f, g, o] = act(x_s + h_{s-1} @ W_hh^T)`, `c_s = f*c_{s-1} + i*g`, `h_s = o*tanh(c_s)`
    (then `@ W_hr^T` with a projection); saves the activated gates and c_s, both written in place into
    `saved`: its gate part starts as x_proj in processing order (a step adds `h @ W_hh^T` and activates in
    place), its c part *is* the cell state buffer."""

    def __init__(self, x_proj: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, w_hr: Tensor | None):
        T = x_proj.shape[0]
        D, B, _ = h0.shape
        H = c0.shape[-1]
        saved = x_proj.new_empty(T, D * B * 5 * H)
        gates = saved[:, :D * B * 4 * H].view(T, D, B, 4, H)
        cs = saved[:, D * B * 4 * H:].view(T, D, B, H)
        copy_to_processing_order(gates.view(T, D, B, 4 * H), x_proj)
        self.w_t = w_hh.transpose(1, 2)
        self.gates = gates.view(T, D, B, 4 * H).unbind(0)
        self.i_f = gates[:, :, :, 0:2].unbind(0)
        self.i, self.f, self.g, self.o = (gates[:, :, :, k].unbind(0) for k in range(4))
        self.w_hr_t = None if w_hr is None else w_hr.transpose(1, 2)
        self.m = None if w_hr is None else x_proj.new_empty(D, B, H)  # o * tanh(c) before the projection
        self.initial = (h0, c0)
        self.states = (x_proj.new_empty((T,) + h0.shape), cs)
        self.saved = (saved,)

    def step(self, s: int, state: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> None:
        (h, c), (h_new, c_new) = state, new
        self.gates[s].baddbmm_(h, self.w_t)
        torch.sigmoid_(self.i_f[s])
        torch.tanh_(self.g[s])
        torch.sigmoid_(self.o[s])
        torch.mul(self.f[s], c, out=c_new)
        c_new.addcmul_(self.i[s], self.g[s])
        m = h_new if self.m is None else self.m
        torch.tanh(c_new, out=m)
        m.mul_(self.o[s])
        if self.m is not None:
            torch.bmm(m, self.w_hr_t, out=h_new)


class _GRUForward:
    """`[r, z] = sigmoid(x_s + h_{s-1} @ W_h{r,z}^T)`, `n = tanh(x_n + r * (h_{s-1} @ W_hn^T + b_hn))`,
    `h_s = n + z * (h_{s-1} - n)`; saves r, z, `W_hn h + b_hn` and n.

    `saved` starts as x_proj in processing order with the n block moved to the n part and b_hn in its
    place, so a step's one in-place baddbmm gives `[r_pre, z_pre, W_hn h + b_hn]`, the n part becomes n
    in place."""

    def __init__(self, x_proj: Tensor, w_hh: Tensor, h0: Tensor, b_hn: Tensor | None):
        T = x_proj.shape[0]
        D, B, H = h0.shape
        saved = x_proj.new_empty(T, D * B * 4 * H)
        rzh = saved[:, :D * B * 3 * H].view(T, D, B, 3, H)
        n = saved[:, D * B * 3 * H:].view(T, D, B, H)
        x = x_proj.unflatten(-1, (D, 3, H))  # [T, B, D, 3, H]
        copy_to_processing_order(rzh.view(T, D, B, 3 * H)[..., :2 * H], x[:, :, :, 0:2].flatten(3))
        copy_to_processing_order(n, x[:, :, :, 2])
        if b_hn is None:
            rzh[:, :, :, 2].zero_()
        else:
            rzh[:, :, :, 2].copy_(b_hn.view(1, D, 1, H).expand(T, D, B, H))
        self.w_t = w_hh.transpose(1, 2)
        self.rzh = rzh.view(T, D, B, 3 * H).unbind(0)
        self.rz = rzh[:, :, :, 0:2].unbind(0)
        self.r, self.z, self.hn = (rzh[:, :, :, k].unbind(0) for k in range(3))
        self.n = n.unbind(0)
        self.initial = (h0,)
        self.states = (x_proj.new_empty((T,) + h0.shape),)
        self.saved = (saved,)

    def step(self, s: int, state: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> None:
        self.rzh[s].baddbmm_(state[0], self.w_t)
        torch.sigmoid_(self.rz[s])
        self.n[s].addcmul_(self.r[s], self.hn[s])
        torch.tanh_(self.n[s])
        torch.lerp(self.n[s], state[0], self.z[s], out=new[0])  # n + z * (h - n)


# ----------------------------------------------------------------------------------------------- backward

def recurrence_backward(
    out: Tensor,
    grad_out: Tensor,
    grad_h_n: Tensor,
    w_hh: Tensor,
    *,
    relu: bool = False,
    cell: str | None = None,
    lengths: Tensor | None = None,
    saved: Tensor | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    grad_c_n: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """BPTT through `recurrence_forward` (same buffers; `saved` is what it returned).

    Args:
        out: `[T, B, D*P]` the forward's output.
        grad_out: `[T, B, D*P]`, grad_h_n: `[D, B, P]`, grad_c_n: `[D, B, H]` or None (LSTM): the
            gradients of the forward's outputs.
        w_hh: `[D, G*H, P]`.
        relu, cell, lengths: as for the forward.
        saved: the forward's `saved` (LSTM, GRU).
        h0: `[D, B, P]`: needed by GRU (its update gate's gradient reads h_{s-1}), ignored otherwise.
        c0: `[D, B, H]` (LSTM).
        w_hr: `[D, P, H]` (LSTM with a projection).

    Returns:
        `grad_pre [T, B, D*G*H]`: the gradient of the gates' pre-activations on the input side (of x_proj,
        0 at padded steps), followed by:

        * Elman: `grad_h0`. `grad_pre` is also the hidden side's: the caller's GEMMs give grad_x, dW_ih,
          dW_hh (with h_{t-1} from out / h0) and db_ih = db_hh = grad_pre summed over (T, B).
        * LSTM: `grad_h0 [D, B, P]`, `grad_c0 [D, B, H]`, `grad_w_hr [D, P, H]` (None without a
          projection; one GEMM over all steps after the loop: sum_t dh_t^T m_t). Input and hidden sides
          share grad_pre as for Elman.
        * GRU: `grad_h0`, `grad_hn [T, B, D*H]`: the gradient of `W_hn h + b_hn` (= r * grad of n's
          pre-activation). The hidden side differs from grad_pre only in the n block: dW_hh's r, z rows
          and db_hr, db_hz come from grad_pre's r, z columns, its n rows and db_hn from grad_hn.
    """
    mode = cell_mode(cell, relu)
    check_cell_arguments(mode, c0=c0, w_hr=w_hr, saved=saved, h0=h0, grad_c_n=grad_c_n)
    T = out.shape[0]
    D = w_hh.shape[0]
    g = to_processing_order(grad_out, D)  # gradient reaching each step's state, completed in place
    active = None if lengths is None else activity_mask(lengths, T, D, g.dtype)
    if active is not None:
        g.mul_(active)  # padded outputs are constant zeros
    g[T - 1].add_(grad_h_n)
    if mode == "LSTM":
        run = _LSTMBackward(saved, c0, w_hr, grad_c_n, active)
    elif mode == "GRU":
        run = _GRUBackward(saved, out, h0, active)
    else:
        run = _ElmanBackward(out, D, mode == "RNN_RELU", active)
    # run.dz [T, D, B, G*H] holds each step's gradient factors and becomes the pre-activation gradient in
    # place; run.carry [T, D, B, P] (or None) is how much of g_s reaches g_{s-1} directly.
    gs, dzs = g.unbind(0), run.dz.unbind(0)
    carry = None if run.carry is None else run.carry.unbind(0)
    for s in range(T - 1, 0, -1):
        run.step(s, gs[s])
        gs[s - 1].baddbmm_(dzs[s], w_hh)  # + dz_s @ W_hh: the gradient flowing into h_{s-1}
        if carry is not None:
            gs[s - 1].addcmul_(gs[s], carry[s])
    run.step(0, gs[0])
    grad_h0 = torch.bmm(dzs[0], w_hh)
    if carry is not None:
        grad_h0.addcmul_(gs[0], carry[0])
    return run.result(g, grad_h0)


class _ElmanBackward:
    """dz_s = g_s * act'(z_s), act' from the outputs; inactive steps pass g through unchanged."""

    def __init__(self, out: Tensor, D: int, relu: bool, active: Tensor | None):
        deriv = to_processing_order(out, D)  # a copy: becomes act'(z), then dz, in place
        if relu:
            deriv = (deriv > 0).to(deriv.dtype)
        else:
            deriv.mul_(deriv).neg_().add_(1.0)
        if active is not None:
            deriv.mul_(active)  # no pre-activation at an inactive step: dz = 0 there
        self.dz = deriv
        self.dzs = deriv.unbind(0)
        self.carry = None if active is None else 1.0 - active

    def step(self, s: int, g: Tensor) -> None:
        self.dzs[s].mul_(g)

    def result(self, g: Tensor, grad_h0: Tensor) -> tuple[Tensor, Tensor]:
        return to_time_order(self.dz), grad_h0


class _LSTMBackward:
    """Per step, with dm = g (or g @ W_hr with a projection) the gradient reaching o*tanh(c):
    `dc = dc_next * f_next + dm * o * (1 - tanh(c)^2)`, then
    `dz = [dc * g*i(1-i), dc * c_prev*f(1-f), dc * i*(1-g^2), dm * tanh(c)*o(1-o)]`.
    The bracketed factors (`K`, which becomes dz in place), `o * (1 - tanh(c)^2)` (`A`) and the cell
    carry f (`F`, 1 at inactive steps) are computed for all steps before the loop."""

    def __init__(self, saved: Tensor, c0: Tensor, w_hr: Tensor | None, grad_c_n: Tensor | None,
                 active: Tensor | None):
        T = saved.shape[0]
        D, B, H = c0.shape
        gates = saved[:, :D * B * 4 * H].view(T, D, B, 4, H)
        c = saved[:, D * B * 4 * H:].view(T, D, B, H)
        i, f, g, o = gates.unbind(3)
        tanh_c = torch.tanh(c)
        # in place, few full-size temporaries (on a CPU each fresh one costs its page faults); 1 - x as
        # -x + 1, not x - x*x, which cancels for saturated gates
        K = torch.empty_like(gates)
        K_i, K_f, K_g, K_o = K.unbind(3)
        torch.mul(i, -1, out=K_i).add_(1).mul_(i).mul_(g)  # g * i(1-i)
        torch.mul(f, -1, out=K_f).add_(1).mul_(f)  # c_prev * f(1-f); c carries through inactive steps
        K_f[1:].mul_(c[:-1])
        K_f[0].mul_(c0)
        torch.mul(g, g, out=K_g).neg_().add_(1).mul_(i)  # i * (1-g^2)
        torch.mul(o, -1, out=K_o).add_(1).mul_(o).mul_(tanh_c)  # tanh(c) * o(1-o)
        A = torch.mul(tanh_c, tanh_c).neg_().add_(1).mul_(o)  # o * (1 - tanh(c)^2)
        F = f
        if active is not None:  # where, not a product: gates of padded steps may be inf or nan
            inactive = active == 0
            K.masked_fill_(inactive.unsqueeze(3), 0)
            A.masked_fill_(inactive, 0)
            F = f.masked_fill(inactive, 1)  # an inactive step passes dc through unchanged
        self.T = T
        self.dz = K.view(T, D, B, 4 * H)
        self.K_ifg = K[:, :, :, 0:3].unbind(0)
        self.K_o = K[:, :, :, 3].unbind(0)
        self.A, self.F = A.unbind(0), F.unbind(0)
        self.carry = None if active is None else 1.0 - active
        self.dc = c0.new_zeros(D, B, H) if grad_c_n is None else grad_c_n.clone(memory_format=torch.contiguous_format)
        self.w_hr = w_hr
        self.dm = self.m = None
        if w_hr is not None:
            self.dm = c0.new_empty(D, B, H)
            # m = o * tanh(c) for dW_hr after the loop, 0 where h did not come from it (inactive steps)
            self.m = o * tanh_c
            if active is not None:
                self.m.masked_fill_(inactive, 0)

    def step(self, s: int, g: Tensor) -> None:
        dm = g if self.w_hr is None else torch.bmm(g, self.w_hr, out=self.dm)
        if s < self.T - 1:
            self.dc.mul_(self.F[s + 1])  # through c_{s+1} = f_{s+1} * c_s + ...
        self.dc.addcmul_(dm, self.A[s])  # through h_s = o_s * tanh(c_s): dc is now dL/dc_s
        self.K_ifg[s].mul_(self.dc.unsqueeze(2))
        self.K_o[s].mul_(dm)

    def result(self, g: Tensor, grad_h0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        grad_c0 = self.dc.mul_(self.F[0])
        grad_w_hr = None if self.w_hr is None else torch.einsum("tdbp,tdbh->dph", g, self.m)
        return to_time_order(self.dz), grad_h0, grad_c0, grad_w_hr


class _GRUBackward:
    """With g the gradient reaching h_s = n + z * (h_{s-1} - n), dn = g*(1-z)*(1-n^2):
    hidden side `dz = g * [dn/g * hn * r(1-r), (h_prev - n) * z(1-z), dn/g * r]` (`K`, all steps before
    the loop, becomes dz in place), carry z; after the loop the input side's n block is `g * (1-z)(1-n^2)`."""

    def __init__(self, saved: Tensor, out: Tensor, h0: Tensor, active: Tensor | None):
        T = saved.shape[0]
        D, B, H = h0.shape
        rzh = saved[:, :D * B * 3 * H].view(T, D, B, 3, H)
        r, z, hn = rzh.unbind(3)
        n = saved[:, D * B * 3 * H:].view(T, D, B, H)
        shifted = out.new_empty(T + 1, D, B, H)  # h_{s-1} of step s at row s: h0, then out (0 at padded steps)
        shifted[0] = h0
        copy_to_processing_order(shifted[1:], out)
        h_prev = shifted[:T]
        if active is not None and T > 1:  # a reverse row starts after its padded steps: from h0
            torch.where(active[:-1] != 0, h_prev[1:], h0, out=h_prev[1:])
        # in place, few full-size temporaries; 1 - x as -x + 1
        K = torch.empty_like(rzh)
        K_r, K_z, K_hn = K.unbind(3)
        K_n = torch.mul(n, n).neg_().add_(1)  # (1-z) * (1-n^2), the input side's n factor
        torch.mul(z, -1, out=K_z).add_(1)
        K_n.mul_(K_z)
        K_z.mul_(z).mul_(h_prev.sub_(n))  # (h_prev - n) * z(1-z)
        torch.mul(K_n, r, out=K_hn)  # r * (1-z)(1-n^2)
        torch.mul(r, -1, out=K_r).add_(1).mul_(r).mul_(hn).mul_(K_n)  # hn * r(1-r) * (1-z)(1-n^2)
        carry = z
        if active is not None:  # where, not a product: gates of padded steps may be inf or nan
            inactive = active == 0
            K.masked_fill_(inactive.unsqueeze(3), 0)
            K_n.masked_fill_(inactive, 0)
            carry = z.masked_fill(inactive, 1)  # an inactive step passes g through unchanged
        self.K = K
        self.K_n = K_n
        self.dz = K.view(T, D, B, 3 * H)
        self.dzs = K.unbind(0)
        self.carry = carry

    def step(self, s: int, g: Tensor) -> None:
        self.dzs[s].mul_(g.unsqueeze(2))

    def result(self, g: Tensor, grad_h0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        grad_hn = to_time_order(self.K[:, :, :, 2])
        torch.mul(g, self.K_n, out=self.K[:, :, :, 2])  # the input side's n block
        return to_time_order(self.dz), grad_h0, grad_hn


def check_cell_arguments(mode: str, **arguments: Tensor | None) -> None:
    """Which optional tensors a cell takes (c0, w_hr: LSTM; b_hn: GRU) and needs (c0, saved, h0)."""
    takes = {"c0": mode == "LSTM", "w_hr": mode == "LSTM", "b_hn": mode == "GRU", "grad_c_n": mode == "LSTM",
             "saved": mode in _SAVED_WIDTH, "h0": True}
    needs = {"c0": mode == "LSTM", "saved": mode in _SAVED_WIDTH, "h0": mode == "GRU"}
    for name, value in arguments.items():
        if value is not None and not takes[name]:
            raise ValueError(f"{name}: the {mode} cell takes no {name}")
        if value is None and needs.get(name, False):
            raise ValueError(f"{name}: the {mode} cell needs {name}")


# ------------------------------------------------------------------------------------------- composite

def differentiable_layer(
    x: Tensor, h0: Tensor, params: list[Tensor], lengths: Tensor | None, *,
    relu: bool = False, cell: str | None = None, c0: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """One layer (all directions) from plain differentiable ops: no `out=`, no in-place update, no
    hand-written backward. Same contract as `functional.layer_forward` (`x [T, B, I]`, `h0 [D, B, P]`,
    optional `lengths [B]`), `params` per direction in nn's order: `(w_ih, w_hh[, b_ih, b_hh][, w_hr])`
    (`w_hr` only for a projected LSTM), the cell as for `recurrence_forward`, `c0 [D, B, H]` for LSTM.
    Returns `(out, h_n)`, for LSTM `(out, h_n, c_n)`.

    Autograd differentiates it to any order and `torch.func` transforms batch it, which is what the fast
    paths cannot offer: the layer's backward differentiates this recomputation instead of running its
    kernels when a gradient is itself being differentiated (`create_graph=True`), batched
    (`is_grads_batched=True`) or transformed (`torch.func.jacrev`, `vjp`, `grad`)."""
    mode = cell_mode(cell, relu)
    check_cell_arguments(mode, c0=c0)
    T, B, _ = x.shape
    D = h0.shape[0]
    per_direction = len(params) // D
    kinds = parameter_kinds(mode, per_direction)
    params = [p.to(x.dtype) for p in params]  # autocast: weights run in x's dtype, gradients flow back

    def each(kind: str) -> list[Tensor]:
        return params[kinds.index(kind)::per_direction]

    w_ih = torch.cat(each("w_ih"))
    w_hh_t = torch.stack(each("w_hh")).transpose(1, 2)  # [D, P, G*H], h @ W_hh^T per direction
    GH = w_ih.shape[0] // D
    H = GH // _GATES[mode]
    x_proj = x @ w_ih.t()
    b_hn = None
    if "b_ih" in kinds:
        b_ih, b_hh = torch.stack(each("b_ih")), torch.stack(each("b_hh"))  # [D, G*H]
        if mode == "GRU":  # b_hn stays inside r * (...)
            b_hn = b_hh[:, 2 * H:].unsqueeze(1)  # [D, 1, H]
            b_hh = torch.cat((b_hh[:, :2 * H], torch.zeros_like(b_hn.squeeze(1))), 1)
        x_proj = x_proj + (b_ih + b_hh).reshape(D * GH)
    xs = x_proj.reshape(T, B, D, GH).permute(0, 2, 1, 3)  # [T, D, B, G*H]
    if D == 2:  # processing order: step s of the reverse direction reads time T-1-s
        xs = torch.stack((xs[:, 0], xs[:, 1].flip(0)), 1)
    if mode == "LSTM":
        w_hr_t = torch.stack(each("w_hr")).transpose(1, 2) if "w_hr" in kinds else None

        def step(x_s, h, c):
            i, f, g, o = (x_s + torch.bmm(h, w_hh_t)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return (h if w_hr_t is None else torch.bmm(h, w_hr_t)), c
        state = (h0, c0)
    elif mode == "GRU":
        def step(x_s, h):
            x_r, x_z, x_n = x_s.chunk(3, -1)
            h_r, h_z, h_n = torch.bmm(h, w_hh_t).chunk(3, -1)
            if b_hn is not None:
                h_n = h_n + b_hn
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return (n + z * (h - n),)
        state = (h0,)
    else:
        act = torch.relu if mode == "RNN_RELU" else torch.tanh

        def step(x_s, h):
            return (act(x_s + torch.bmm(h, w_hh_t)),)
        state = (h0,)
    active = None if lengths is None else activity_mask(lengths, T, D, x.dtype).bool()
    states = []
    for s in range(T):
        new = step(xs[s], *state)
        if active is not None:  # inactive rows keep their state
            new = tuple(torch.where(active[s], n, o) for n, o in zip(new, state))
        states.append(new[0])
        state = new
    st = torch.stack(states)  # [T, D, B, P]
    if active is not None:
        st = st * active
    out = torch.stack((st[:, 0], st[:, 1].flip(0)), 2) if D == 2 else st[:, 0].unsqueeze(2)
    return (out.reshape(T, B, D * st.shape[-1]), *state)


def parameter_kinds(mode: str, per_direction: int) -> list[str]:
    """What each of a direction's parameters is, from their count (nn's order)."""
    per_direction = int(per_direction)  # under torch.compile a count from a (symbolic) size
    kinds = {2: ["w_ih", "w_hh"], 4: ["w_ih", "w_hh", "b_ih", "b_hh"]}
    if mode == "LSTM":
        kinds |= {3: ["w_ih", "w_hh", "w_hr"], 5: ["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]}
    if per_direction not in kinds:
        raise ValueError(f"params: {per_direction} tensors per direction do not form a {mode} layer")
    return kinds[per_direction]
