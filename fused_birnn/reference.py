"""Readable pure-PyTorch definitions of ``torch.nn.RNN``, ``torch.nn.LSTM`` (``proj_size`` included) and
``torch.nn.GRU`` (multi-layer, optionally bidirectional).

This is the specification the Triton kernels and the PyTorch path are tested against. The computation
flow is the same for the three cells:

* Each layer ``l`` runs one unidirectional recurrence per direction: the Elman cell
  ``h_t = act(x_t W_ih^T + b_ih + h_prev W_hh^T + b_hh)`` (:func:`run_direction`), the LSTM cell
  (:func:`lstm_cell`, :func:`run_lstm_direction`) or the GRU cell (:func:`gru_cell`,
  :func:`run_gru_direction`), PyTorch's exact formulas.
* The forward direction reads ``x_0 .. x_{T-1}`` starting from ``h0[D*l]``. The reverse direction
  reads the time-reversed input ``x_{T-1} .. x_0`` starting from ``h0[2*l+1]``, i.e. ``h0[2*l+1]``
  is the reverse state *before it reads the last time step*; its outputs are flipped back to time
  order before concatenation, so ``output[t] = [h_fwd_t, h_rev_t]`` pairs states of the same ``t``.
* Every layer after the first feeds that ``[fwd, rev]`` concatenation of the layer below to
  *both* of its directions, hence ``weight_ih_l{k}`` (and ``weight_ih_l{k}_reverse``) has shape
  ``(G*H, D*H_out)`` for ``k >= 1`` (``G`` gates: 1 Elman, 4 LSTM, 3 GRU; ``H_out`` is ``proj_size``
  for a projected LSTM, else ``H``).
* ``h_n[D*l + d]`` is the last state that direction ``d`` of layer ``l`` produced: the forward
  state after ``t = T-1``, the reverse state after ``t = 0``. The output is the top layer's
  concatenation. An LSTM's cell states ``c0`` / ``c_n`` follow the same order.

Dropout between layers is not modelled (it is the identity in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "gru_cell", "gru_reference", "lstm_cell", "lstm_reference", "rnn_reference", "run_direction",
    "run_gru_direction", "run_lstm_direction",
]

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

    def step(x_proj_t, h):
        pre = x_proj_t + h @ w_hh.T
        if b_hh is not None:
            pre = pre + b_hh
        return (act(pre),)

    outputs, (h,) = _scan(x, (h0,), w_ih, b_ih, step, reverse)
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
    x = _batched(input, batch_first)
    _activation(nonlinearity)
    num_directions = 2 if bidirectional else 1
    expected = (num_layers * num_directions, x.shape[1], params["weight_hh_l0"].shape[1])
    if hx is None:
        hx = x.new_zeros(expected)
    _check_state("hx", hx, expected)

    def run(x, state, suffix, reverse):
        out, h_last = run_direction(
            x,
            state[0],
            params["weight_ih" + suffix],
            params["weight_hh" + suffix],
            params["bias_ih" + suffix] if bias else None,
            params["bias_hh" + suffix] if bias else None,
            reverse=reverse,
            nonlinearity=nonlinearity,
        )
        return out, (h_last,)

    x, (h_n,) = _stack(x, (hx,), num_layers, num_directions, run)
    output = x.transpose(0, 1) if batch_first else x
    return output, h_n


def lstm_cell(
    x_proj: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""One LSTM step, ``torch.nn.LSTM``'s formulas (gate rows in the order i, f, g, o).

    .. math::
        i, f, g, o &= \mathrm{chunk}_4(x_{proj} + h W_{hh}^T + b_{hh}) \\
        c' &= \sigma(f) \odot c + \sigma(i) \odot \tanh(g) \\
        h' &= \sigma(o) \odot \tanh(c'), \quad\text{then } h' \leftarrow h' W_{hr}^T
        \text{ with a projection (no bias; } c \text{ is never projected)}

    Args:
        x_proj: this step's input projection ``x_t W_ih^T + b_ih``.
        h: previous (projected, if ``w_hr`` is given) hidden state.
        c: previous cell state.
        w_hh: hidden-to-hidden weight, b_hh: its bias or ``None``.
        w_hr: projection weight, or ``None``.

    Returns:
        ``(h', c')``.

    Shape:
        - x_proj: :math:`(B, 4H)`, h: :math:`(B, H_{out})`, c: :math:`(B, H)`
        - w_hh: :math:`(4H, H_{out})`, b_hh: :math:`(4H)`, w_hr: :math:`(H_{out}, H)`
          (:math:`H_{out}` = ``proj_size`` with a projection, else :math:`H`)
    """
    gates = x_proj + h @ w_hh.T
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    if w_hr is not None:
        h = h @ w_hr.T
    return h, c


def gru_cell(x_proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    r"""One GRU step, ``torch.nn.GRU``'s formulas (gate rows in the order r, z, n).

    .. math::
        r &= \sigma(x_r + h W_{hr}^T + b_{hr}), \quad z = \sigma(x_z + h W_{hz}^T + b_{hz}) \\
        n &= \tanh(x_n + r \odot (h W_{hn}^T + b_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h

    The reset gate multiplies ``h W_hn^T + b_hn`` (not ``h``), so ``b_hn`` stays apart from the input
    projection ``x_n = x_t W_in^T + b_in``. (``W_hr`` here is the reset gate's block of ``weight_hh``,
    not an LSTM projection.)

    Shape:
        - x_proj: :math:`(B, 3H)` (``x_t W_ih^T + b_ih``), h: :math:`(B, H)`
        - w_hh: :math:`(3H, H)`, b_hh: :math:`(3H)`
    """
    x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
    hidden = h @ w_hh.T
    if b_hh is not None:
        hidden = hidden + b_hh
    h_r, h_z, h_n = hidden.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def run_lstm_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    *,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    r"""Run one direction of one LSTM layer over a whole sequence (:func:`lstm_cell` per step).

    Same time conventions as :func:`run_direction`: a reverse direction reads ``x.flip(0)`` and its
    outputs are flipped back.

    Returns:
        ``(outputs, (h_last, c_last))``: the (projected) hidden states in time order, and the states
        after the last step read.

    Shape:
        - x: :math:`(T, B, I)`, h0: :math:`(B, H_{out})`, c0: :math:`(B, H)`
        - w_ih: :math:`(4H, I)`, w_hh: :math:`(4H, H_{out})`, b_ih / b_hh: :math:`(4H)`,
          w_hr: :math:`(H_{out}, H)`
        - outputs: :math:`(T, B, H_{out})`, h_last: :math:`(B, H_{out})`, c_last: :math:`(B, H)`
    """
    outputs, (h, c) = _scan(
        x, (h0, c0), w_ih, b_ih, lambda x_t, h, c: lstm_cell(x_t, h, c, w_hh, b_hh, w_hr), reverse
    )
    return outputs, (h, c)


def run_gru_direction(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    r"""Run one direction of one GRU layer over a whole sequence (:func:`gru_cell` per step).

    Same time conventions as :func:`run_direction`.

    Returns:
        ``(outputs, h_last)``.

    Shape:
        - x: :math:`(T, B, I)`, h0: :math:`(B, H)`
        - w_ih: :math:`(3H, I)`, w_hh: :math:`(3H, H)`, b_ih / b_hh: :math:`(3H)`
        - outputs: :math:`(T, B, H)`, h_last: :math:`(B, H)`
    """
    outputs, (h,) = _scan(x, (h0,), w_ih, b_ih, lambda x_t, h: (gru_cell(x_t, h, w_hh, b_hh),), reverse)
    return outputs, h


def lstm_reference(
    input: Tensor,
    hx: tuple[Tensor, Tensor] | None,
    params: Mapping[str, Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    bidirectional: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    r"""Multi-layer (optionally bidirectional) LSTM, computed exactly like ``torch.nn.LSTM``.

    A projection (``proj_size > 0``) is used when ``params`` holds ``weight_hr_l0``: then the hidden
    state, the output and ``h0`` / ``h_n`` are ``proj_size`` wide while the cell state keeps
    ``hidden_size``, and layers above the first read ``D * proj_size`` features.

    Args:
        input: batched input sequence.
        hx: ``(h0, c0)`` ordered like ``rnn_reference``'s ``hx``, or ``None`` for zeros.
        params: ``nn.LSTM`` parameter names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
            ``bias_hh_l0``, ``weight_hr_l0`` and the ``..._reverse`` variants) mapped to tensors, e.g.
            ``dict(module.named_parameters())``.
        num_layers, bias, batch_first, bidirectional: as for ``rnn_reference``.

    Returns:
        ``(output, (h_n, c_n))``.

    Shape:
        - input: :math:`(T, B, I)`, or :math:`(B, T, I)` if ``batch_first``
        - h0, h_n: :math:`(L \cdot D, B, H_{out})`; c0, c_n: :math:`(L \cdot D, B, H)`
        - output: :math:`(T, B, D \cdot H_{out})`, or :math:`(B, T, D \cdot H_{out})` if ``batch_first``
    """
    x = _batched(input, batch_first)
    num_directions = 2 if bidirectional else 1
    four_h, h_out = params["weight_hh_l0"].shape
    hidden_size = four_h // 4
    projected = "weight_hr_l0" in params
    states = num_layers * num_directions
    if hx is None:
        hx = (x.new_zeros(states, x.shape[1], h_out), x.new_zeros(states, x.shape[1], hidden_size))
    _check_state("hx[0]", hx[0], (states, x.shape[1], h_out))
    _check_state("hx[1]", hx[1], (states, x.shape[1], hidden_size))

    def run(x, state, suffix, reverse):
        return run_lstm_direction(
            x,
            state[0],
            state[1],
            params["weight_ih" + suffix],
            params["weight_hh" + suffix],
            params["bias_ih" + suffix] if bias else None,
            params["bias_hh" + suffix] if bias else None,
            params["weight_hr" + suffix] if projected else None,
            reverse=reverse,
        )

    x, (h_n, c_n) = _stack(x, tuple(hx), num_layers, num_directions, run)
    output = x.transpose(0, 1) if batch_first else x
    return output, (h_n, c_n)


def gru_reference(
    input: Tensor,
    hx: Tensor | None,
    params: Mapping[str, Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Multi-layer (optionally bidirectional) GRU, computed exactly like ``torch.nn.GRU``.

    Arguments, returns and shapes as for ``rnn_reference`` (``params`` with ``nn.GRU``'s names; its
    ``weight_*`` and ``bias_*`` tensors have ``3H`` rows).
    """
    x = _batched(input, batch_first)
    num_directions = 2 if bidirectional else 1
    hidden_size = params["weight_hh_l0"].shape[1]
    expected = (num_layers * num_directions, x.shape[1], hidden_size)
    if hx is None:
        hx = x.new_zeros(expected)
    _check_state("hx", hx, expected)

    def run(x, state, suffix, reverse):
        out, h_last = run_gru_direction(
            x,
            state[0],
            params["weight_ih" + suffix],
            params["weight_hh" + suffix],
            params["bias_ih" + suffix] if bias else None,
            params["bias_hh" + suffix] if bias else None,
            reverse=reverse,
        )
        return out, (h_last,)

    x, (h_n,) = _stack(x, (hx,), num_layers, num_directions, run)
    output = x.transpose(0, 1) if batch_first else x
    return output, h_n


def _scan(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, b_ih: Tensor | None, step, reverse: bool):
    """One direction: the input projection for all steps at once (it has no recurrence), then
    ``state = step(x_proj[t], *state)`` in reading order; returns the first state component of every
    step in time order, and the last state."""
    if reverse:
        x = x.flip(0)
    x_proj = x @ w_ih.T
    if b_ih is not None:
        x_proj = x_proj + b_ih
    outputs = []
    for t in range(x.shape[0]):
        state = step(x_proj[t], *state)
        outputs.append(state[0])
    outputs = torch.stack(outputs) if outputs else x_proj.new_zeros(0, *state[0].shape)
    if reverse:
        outputs = outputs.flip(0)
    return outputs, state


def _stack(x: Tensor, initial: tuple[Tensor, ...], num_layers: int, num_directions: int, run):
    """The layers: ``run(x, states, suffix, reverse) -> (outputs, last_states)`` per layer and
    direction, where ``states`` are this layer-direction's rows of ``initial`` (``h0``, and ``c0`` for
    an LSTM) and ``suffix`` names its parameters (``_l{k}`` or ``_l{k}_reverse``). Returns the top
    layer's output and the stacked last states, ordered like ``initial``."""
    finals = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            state = tuple(s[layer * num_directions + direction] for s in initial)
            out, last = run(x, state, suffix, direction == 1)
            outputs.append(out)
            finals.append(last)
        # Both directions are in time order here, so this pairs [h_fwd_t, h_rev_t] per time step;
        # it is the input of both directions of the next layer.
        x = torch.cat(outputs, dim=-1)
    return x, tuple(torch.stack(f) for f in zip(*finals))


def _batched(input: Tensor, batch_first: bool) -> Tensor:
    if input.dim() != 3:
        raise ValueError(f"input: expected a 3-D batched tensor, got {input.dim()}-D")
    return input.transpose(0, 1) if batch_first else input


def _check_state(name: str, state: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(state.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(state.shape)}")


def _activation(nonlinearity: str):
    try:
        return _ACTIVATIONS[nonlinearity]
    except KeyError:
        raise ValueError(
            f"nonlinearity: expected one of {sorted(_ACTIVATIONS)}, got {nonlinearity!r}"
        ) from None
