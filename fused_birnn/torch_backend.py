"""The pure-PyTorch recurrence: same contract as the Triton kernels, for any device and dtype.

It is a product path (CPU without the interpreter, float64 on CUDA, bf16 on CPU), not a toy:

* both directions advance together: one `baddbmm` over a direction batch `[D, B, H] @ [D, H, H]` and one
  in-place activation per step, into a state buffer laid out in *processing order*
  `[T, D, B, H]` (step s of direction 1 is time T-1-s), so every step reads and writes contiguous slices;
* the backward is hand-written BPTT (two ops per step: `dz = g * act'` and `g_prev += dz @ W_hh`),
  with act' computed for all steps at once before the loop; weight gradients are left to the caller's matrix products, as with the kernels.

Time layout `[T, B, D*H]` (the kernels' and nn.RNN's) and processing layout convert with one copy per
direction.
"""

from __future__ import annotations

import torch


def to_processing_order(x: torch.Tensor, num_directions: int) -> torch.Tensor:
    """`[T, B, D*H]` time layout -> a new contiguous `[T, D, B, H]`, direction 1 reversed in time."""
    T, B, DH = x.shape
    v = x.unflatten(-1, (num_directions, DH // num_directions)).transpose(1, 2)  # [T, D, B, H] view
    if num_directions == 1:
        return v.clone(memory_format=torch.contiguous_format)
    return torch.stack((v[:, 0], v[:, 1].flip(0)), 1)


def to_time_order(p: torch.Tensor) -> torch.Tensor:
    """Contiguous `[T, D, B, H]` processing layout -> contiguous `[T, B, D*H]`."""
    T, D, B, H = p.shape
    if D == 1:
        return p.view(T, B, H)
    return torch.stack((p[:, 0], p[:, 1].flip(0)), 2).view(T, B, D * H)


def activity_mask(lengths: torch.Tensor, T: int, num_directions: int, dtype: torch.dtype) -> torch.Tensor:
    """`[T, D, B, 1]` 1/0 mask in processing order: whether row b is active at step s of direction d.

    As in the kernels (kernels/indexing.py): step s is time s forward and T-1-s reverse for every row;
    a row is active where that time is below its length, so a reverse row waits, state untouched,
    until it reaches its own last valid step."""
    steps = torch.arange(T, device=lengths.device)
    times = torch.stack([steps, T - 1 - steps], 1)[:, :num_directions]  # [T, D]
    return (times[:, :, None] < lengths[None, None, :]).to(dtype).unsqueeze(-1)


def recurrence_forward(
    x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, *, relu: bool,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h_t = act(x_proj_t + h_{t-1} @ W_hh[d]^T)` for every direction.

    Args:
        x_proj: `[T, B, D*H]` input projection, biases included.
        w_hh: `[D, H, H]`.
        h0: `[D, B, H]`.
        relu: ReLU instead of tanh.
        lengths: optional `[B]` valid lengths (on x_proj's device): row b runs its first lengths[b]
            steps, the reverse direction from lengths[b] - 1; padded steps of `out` are 0.

    Returns:
        `(out [T, B, D*H], h_n [D, B, H])`, as the forward kernel writes them.
    """
    T = x_proj.shape[0]
    D = w_hh.shape[0]
    xs = to_processing_order(x_proj, D) if D == 2 else x_proj.unsqueeze(1)  # read only
    states = torch.empty((T, D) + h0.shape[1:], dtype=x_proj.dtype, device=x_proj.device)
    active = None if lengths is None else activity_mask(lengths, T, D, x_proj.dtype).bool()
    w_t = w_hh.transpose(1, 2)
    act_ = torch.relu_ if relu else torch.tanh_
    h = h0
    # per-step views made once (unbind): indexing inside the loop costs more than a small step's math
    for s, (x_s, h_s) in enumerate(zip(xs.unbind(0), states.unbind(0))):
        torch.baddbmm(x_s, h, w_t, out=h_s)
        act_(h_s)
        if active is not None:  # inactive rows keep their state
            torch.where(active[s], h_s, h, out=h_s)
        h = h_s
    out = to_time_order(states if active is None else states * active)
    return out, h.clone()


def recurrence_backward(
    out: torch.Tensor,
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    w_hh: torch.Tensor,
    *,
    relu: bool,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BPTT through `recurrence_forward`: returns `(grad_pre [T, B, D*H], grad_h0 [D, B, H])`, the
    gradients of the pre-activations (0 at padded steps) and of the initial states."""
    T = out.shape[0]
    D = w_hh.shape[0]
    deriv = to_processing_order(out, D)  # a copy: becomes act'(z) in place
    if relu:
        deriv = (deriv > 0).to(deriv.dtype)
    else:
        deriv.mul_(deriv).neg_().add_(1.0)
    g = to_processing_order(grad_out, D)  # gradient reaching each step's state, completed in place
    if lengths is not None:
        active = activity_mask(lengths, T, D, deriv.dtype)
        deriv.mul_(active)  # no pre-activation at an inactive step: dz = 0 there
        g.mul_(active)  # padded outputs are constant zeros
        carry = 1.0 - active  # an inactive step passes its state (and gradient) through unchanged
    g[T - 1].add_(grad_h_n)
    dz = torch.empty_like(g)
    gs, derivs, dzs = g.unbind(0), deriv.unbind(0), dz.unbind(0)
    for s in range(T - 1, 0, -1):
        torch.mul(gs[s], derivs[s], out=dzs[s])
        gs[s - 1].baddbmm_(dzs[s], w_hh)  # + dz_s @ W_hh: the gradient flowing into h_{s-1}
        if lengths is not None:
            gs[s - 1].addcmul_(gs[s], carry[s])
    torch.mul(gs[0], derivs[0], out=dzs[0])
    grad_h0 = torch.bmm(dzs[0], w_hh)
    if lengths is not None:
        grad_h0.addcmul_(gs[0], carry[0])
    return to_time_order(dz), grad_h0


def differentiable_layer(
    x: torch.Tensor, h0: torch.Tensor, params: list[torch.Tensor], lengths: torch.Tensor | None, *,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer (all directions) from plain differentiable ops: no `out=`, no in-place update, no
    hand-written backward. Same contract as `functional.layer_forward` (`x [T, B, I]`, `h0 [D, B, H]`,
    `params` `(w_ih, w_hh[, b_ih, b_hh]) * D`, optional `lengths [B]`).

    Autograd differentiates it to any order and `torch.func` transforms batch it, which is what the fast
    paths cannot offer: the layer's backward differentiates this recomputation instead of running its
    kernels when a gradient is itself being differentiated (`create_graph=True`), batched
    (`is_grads_batched=True`) or transformed (`torch.func.jacrev`, `vjp`, `grad`)."""
    T, B, _ = x.shape
    D, _, H = h0.shape
    per_direction = len(params) // D
    params = [p.to(x.dtype) for p in params]  # autocast: weights run in x's dtype, gradients flow back
    w_ih = torch.cat(params[0::per_direction])
    w_hh_t = torch.stack(params[1::per_direction]).transpose(1, 2)  # [D, H, H], h @ W_hh^T per direction
    x_proj = x @ w_ih.t()
    if per_direction == 4:
        x_proj = x_proj + (torch.cat(params[2::per_direction]) + torch.cat(params[3::per_direction]))
    xs = x_proj.reshape(T, B, D, H).permute(0, 2, 1, 3)  # [T, D, B, H]
    if D == 2:  # processing order: step s of the reverse direction reads time T-1-s
        xs = torch.stack((xs[:, 0], xs[:, 1].flip(0)), 1)
    active = None if lengths is None else activity_mask(lengths, T, D, x.dtype).bool()
    act = torch.relu if relu else torch.tanh
    h, states = h0, []
    for s in range(T):
        new = act(xs[s] + torch.bmm(h, w_hh_t))
        if active is not None:  # inactive rows keep their state
            new = torch.where(active[s], new, h)
        states.append(new)
        h = new
    st = torch.stack(states)  # [T, D, B, H]
    if active is not None:
        st = st * active
    out = torch.stack((st[:, 0], st[:, 1].flip(0)), 2) if D == 2 else st[:, 0].unsqueeze(2)
    return out.reshape(T, B, D * H), h
