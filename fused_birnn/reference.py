"""Readable pure-PyTorch definition of ``torch.nn.RNN`` (multi-layer, optionally bidirectional).

This is the specification the Triton kernels are tested against. The computation flow is:

* Each layer ``l`` runs one unidirectional Elman recurrence per direction,
  ``h_t = act(x_t W_ih^T + b_ih + h_prev W_hh^T + b_hh)``, see :func:`run_direction`.
* The forward direction reads ``x_0 .. x_{T-1}`` starting from ``h0[D*l]``. The reverse direction
  reads the time-reversed input ``x_{T-1} .. x_0`` starting from ``h0[2*l+1]``, i.e. ``h0[2*l+1]``
  is the reverse state *before it reads the last time step*; its outputs are flipped back to time
  order before concatenation, so ``output[t] = [h_fwd_t, h_rev_t]`` pairs states of the same ``t``.
* Every layer after the first feeds that ``[fwd, rev]`` concatenation of the layer below to
  *both* of its directions, hence ``weight_ih_l{k}`` (and ``weight_ih_l{k}_reverse``) has shape
  ``(H, D*H)`` for ``k >= 1``.
* ``h_n[D*l + d]`` is the last state that direction ``d`` of layer ``l`` produced: the forward
  state after ``t = T-1``, the reverse state after ``t = 0``. The output is the top layer's
  concatenation.

Dropout between layers is not modelled (it is the identity in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["rnn_reference", "run_direction"]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def run_direction(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    reverse: bool,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    r"""Run one direction of one RNN layer over a whole sequence.

    Computes :math:`h_t = \mathrm{act}(x_t W_{ih}^T + b_{ih} + h_{prev} W_{hh}^T + b_{hh})`, where
    ``h_prev`` is the state of the previous step *in reading order*. A reverse direction reads
    ``x.flip(0)`` and its outputs are flipped back, so ``outputs[t]`` is always the state right
    after reading ``x[t]``.

    Args:
        x: input sequence, time-major.
        h0: initial state, the state before the first step read (``x[0]`` forward,
            ``x[T-1]`` reverse).
        w_ih: input-to-hidden weight.
        w_hh: hidden-to-hidden weight.
        b_ih: input-to-hidden bias, or ``None``.
        b_hh: hidden-to-hidden bias, or ``None``.
        reverse: read the sequence from the last time step to the first.
        nonlinearity: ``'tanh'`` or ``'relu'``.

    Returns:
        ``(outputs, h_last)``: all states in time order and the state after the last step read.

    Shape:
        - x: :math:`(T, B, I)`
        - h0: :math:`(B, H)`
        - w_ih: :math:`(H, I)`, w_hh: :math:`(H, H)`, b_ih / b_hh: :math:`(H)`
        - outputs: :math:`(T, B, H)`, h_last: :math:`(B, H)`
    """
    act = _activation(nonlinearity)
    if reverse:
        x = x.flip(0)
    # The input projection has no recurrence, so it is done for all time steps at once.
    x_proj = x @ w_ih.T
    if b_ih is not None:
        x_proj = x_proj + b_ih
    h = h0
    states = []
    for t in range(x.shape[0]):
        pre = x_proj[t] + h @ w_hh.T
        if b_hh is not None:
            pre = pre + b_hh
        h = act(pre)
        states.append(h)
    outputs = torch.stack(states) if states else x_proj.new_zeros(0, *h0.shape)
    if reverse:
        outputs = outputs.flip(0)
    return outputs, h


def rnn_reference(
    input: Tensor,
    hx: Tensor | None,
    params: Mapping[str, Tensor],
    *,
    num_layers: int,
    nonlinearity: str = "tanh",
    bias: bool = True,
    batch_first: bool = False,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Multi-layer (optionally bidirectional) Elman RNN, computed exactly like ``torch.nn.RNN``.

    Args:
        input: batched input sequence.
        hx: initial states ordered ``[l0_fwd, l0_rev, l1_fwd, ...]`` (``[l0, l1, ...]`` if
            unidirectional), or ``None`` for zeros.
        params: ``nn.RNN`` parameter names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
            ``bias_hh_l0`` and the ``..._reverse`` variants) mapped to tensors, e.g.
            ``dict(module.named_parameters())``.
        num_layers: number of stacked layers ``L``.
        nonlinearity: ``'tanh'`` or ``'relu'``.
        bias: whether the ``bias_*`` parameters are used.
        batch_first: if ``True``, ``input`` and ``output`` are batch-major (``hx`` and ``h_n``
            never are).
        bidirectional: run a reverse direction in every layer (``D = 2``, else ``D = 1``).

    Returns:
        ``(output, h_n)``: the top layer's ``[fwd, rev]`` states for every time step, and the last
        state of every layer and direction (forward after ``t = T-1``, reverse after ``t = 0``).

    Shape:
        - input: :math:`(T, B, I)`, or :math:`(B, T, I)` if ``batch_first``
        - hx, h_n: :math:`(L \cdot D, B, H)`
        - output: :math:`(T, B, D \cdot H)`, or :math:`(B, T, D \cdot H)` if ``batch_first``
    """
    if input.dim() != 3:
        raise ValueError(f"input: expected a 3-D batched tensor, got {input.dim()}-D")
    _activation(nonlinearity)
    x = input.transpose(0, 1) if batch_first else input
    num_directions = 2 if bidirectional else 1
    hidden_size = params["weight_hh_l0"].shape[1]
    batch = x.shape[1]
    if hx is None:
        hx = x.new_zeros(num_layers * num_directions, batch, hidden_size)
    expected = (num_layers * num_directions, batch, hidden_size)
    if tuple(hx.shape) != expected:
        raise ValueError(f"hx: expected shape {expected}, got {tuple(hx.shape)}")

    h_n = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            out, h_last = run_direction(
                x,
                hx[layer * num_directions + direction],
                params["weight_ih" + suffix],
                params["weight_hh" + suffix],
                params["bias_ih" + suffix] if bias else None,
                params["bias_hh" + suffix] if bias else None,
                reverse=direction == 1,
                nonlinearity=nonlinearity,
            )
            outputs.append(out)
            h_n.append(h_last)
        # Both directions are in time order here, so this pairs [h_fwd_t, h_rev_t] per time step;
        # it is the input of both directions of the next layer.
        x = torch.cat(outputs, dim=-1)

    output = x.transpose(0, 1) if batch_first else x
    return output, torch.stack(h_n)


def _activation(nonlinearity: str):
    try:
        return _ACTIVATIONS[nonlinearity]
    except KeyError:
        raise ValueError(
            f"nonlinearity: expected one of {sorted(_ACTIVATIONS)}, got {nonlinearity!r}"
        ) from None
