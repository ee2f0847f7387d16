"""ONNX export: each layer of `fused_birnn.RNN` / `LSTM` / `GRU` (one custom op `fused_birnn::rnn_layer` /
`lstm_layer` / `gru_layer`) becomes one ONNX `RNN` / `LSTM` / `GRU` node (no loop, no unrolled steps).

`torch.onnx.export` (with its default `dynamo=True`) traces a model with
`torch.export`, where each of our modules calls one custom op per layer; ONNX has no function for those
ops unless it is given one. `onnx_translation_table()` holds them, for `torch.onnx.export`'s
`custom_translation_table=` argument, and `to_onnx(model, args, ...)` is `torch.onnx.export` with it
already passed:

    onnx_program = fused_birnn.export.to_onnx(model, (x,))      # an ONNXProgram, as torch.onnx.export
    onnx_program.save("model.onnx")

One layer maps onto ONNX `RNN` (opset 14) as follows (D directions, our `params` named as nn.RNN's):

    X              x [T, B, I]                                 (time-major, as the op receives it)
    W  [D, H, I]   w_ih of each direction, stacked
    R  [D, H, H]   w_hh of each direction, stacked
    B  [D, 2H]     [b_ih_d, b_hh_d] per direction; omitted without bias (ONNX's default: zeros)
    sequence_lens  lengths as int32, or omitted
    initial_h      h0 [D, B, H]
    activations    ["Tanh"] * D or ["Relu"] * D;  direction "forward" or "bidirectional"
    Y  [T, D, B, H] -> transposed to [T, B, D, H], reshaped to out [T, B, D*H];  Y_h = h_n [D, B, H]

LSTM and GRU map the same way onto ONNX `LSTM` and `GRU` (opset 14), with three differences:

    gate blocks    nn: LSTM i, f, g, o / GRU r, z, n;  ONNX: LSTM i, o, f, c / GRU z, r, h: the rows of
                   W, R and both halves of B are permuted (a Gather with constant indices; the exporter
                   folds it into the weight initializers)
    states         LSTM: initial_h h0 [D, B, H], initial_c c0 [D, B, H]; outputs Y, Y_h = h_n, Y_c = c_n
    GRU            linear_before_reset=1: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), PyTorch's form
                   (ONNX's default 0 is the paper's W_hn (r * h))

The ops' last output, `saved` (what the backward reads), has no ONNX counterpart: an exported graph never
uses it, and the translation returns only the outputs before it. ONNX's `LSTM` has no projection, so an
LSTM with `proj_size > 0` cannot be exported: `to_onnx` refuses it before tracing and the translation
raises if reached through `torch.onnx.export` directly. (torch.nn.LSTM with `proj_size` is no way round:
with torch 2.13 its export writes `LSTM` nodes that onnxruntime 1.32 refuses to run.)

`lengths=` (ONNX's `sequence_lens`) has our semantics in onnxruntime: padded output steps are 0, each
reverse row starts at its own last valid step and `Y_h` (and `Y_c`) hold each row's state at its own
last step (tests/test_export.py checks this for all three cells); as under torch.compile, the exported
graph clamps them to [1, T] rather than checking them. A `PackedSequence` input cannot be exported (nor
can `nn.RNN`'s): `torch.export` takes it apart into its tensors, but the batch size and every row's length
are *values* of `batch_sizes`, not shapes, and unpacking needs them as sizes (`batch_sizes[0]` sizes the
batch), which `torch.export` refuses as a data-dependent guard; pass a padded batch with `lengths=`
instead. `backend=` does not apply: the ONNX runtime runs its own RNN kernel. onnxruntime 1.32 runs fp32
(tested) and fp16 (tried once) models but has no fp64 `RNN` kernel: an fp64 model exports and passes
the ONNX checker, and onnxruntime refuses it (nor has it fp64 `LSTM` or `GRU` kernels).

Needs `onnx` and `onnxscript`: the `export` extra, which also brings `onnxruntime`; importing
`fused_birnn` itself does not import them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from .rnn import LSTM

try:
    from onnxscript import opset18 as op  # ONNX RNN is version 14: the same operator in opset 18
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fused_birnn.export needs onnx and onnxscript: install fused_birnn's `export` extra "
                      "(pip install 'fused_birnn[export]', or '.[export]' from a checkout)") from e

__all__ = ["onnx_translation_table", "to_onnx"]


def rnn_layer_to_onnx(x, h0, params, lengths, relu: bool, backend: str):
    """ONNX graph of `torch.ops.fused_birnn.rnn_layer` (arguments as `fused_birnn.functional.layer_forward`;
    `backend` has no meaning in ONNX): one `RNN` node and the reshapes around it."""
    del backend  # which recurrence runs is a PyTorch-side choice; the runtime picks its own
    num_directions, hidden = h0.shape[0], h0.shape[2]
    if not isinstance(num_directions, int) or not isinstance(hidden, int):
        raise RuntimeError(f"fused_birnn.export: h0's directions and hidden size must be static, got "
                           f"shape {h0.shape}")
    per_direction = len(params) // num_directions  # (w_ih, w_hh[, b_ih, b_hh])
    w_ih = [params[d * per_direction] for d in range(num_directions)]
    w_hh = [params[d * per_direction + 1] for d in range(num_directions)]
    stacked = [_stack(w_ih), _stack(w_hh)]
    if per_direction == 4:  # ONNX's B: [Wb, Rb] per direction
        biases = [op.Concat(params[d * 4 + 2], params[d * 4 + 3], axis=0) for d in range(num_directions)]
        stacked.append(_stack(biases))
    else:
        stacked.append(None)
    y, y_h = op.RNN(
        x, *stacked, _sequence_lens(lengths), h0,
        activations=["Relu" if relu else "Tanh"] * num_directions,
        direction="bidirectional" if num_directions == 2 else "forward",
        hidden_size=hidden,
    )
    return _time_major_out(y), y_h


# nn's gate blocks, listed in ONNX's order: LSTM i, o, f, c <- nn's i, f, g, o; GRU z, r, h <- r, z, n
_LSTM_GATES = (0, 3, 1, 2)
_GRU_GATES = (1, 0, 2)


def lstm_layer_to_onnx(x, h0, c0, params, lengths, backend: str):
    """ONNX graph of `torch.ops.fused_birnn.lstm_layer`: one `LSTM` node and the reshapes around it.
    Returns `(out, h_n, c_n)`; the op's `saved` output has no ONNX counterpart (no graph uses it)."""
    del backend
    num_directions, _, proj = _static(h0, "h0")
    hidden = _static(c0, "c0")[2]
    if proj != hidden:
        raise NotImplementedError(_PROJ_MESSAGE.format(proj_size=proj, where=""))
    weights, recurrent, bias = _gated_weights(params, num_directions, hidden, _LSTM_GATES)
    y, y_h, y_c = op.LSTM(
        x, weights, recurrent, bias, _sequence_lens(lengths), h0, c0,
        direction="bidirectional" if num_directions == 2 else "forward",
        hidden_size=hidden,
    )
    return _time_major_out(y), y_h, y_c


def gru_layer_to_onnx(x, h0, params, lengths, backend: str):
    """ONNX graph of `torch.ops.fused_birnn.gru_layer`: one `GRU` node (`linear_before_reset=1`, PyTorch's
    form) and the reshapes around it. Returns `(out, h_n)`; `saved` has no ONNX counterpart."""
    del backend
    num_directions, _, hidden = _static(h0, "h0")
    weights, recurrent, bias = _gated_weights(params, num_directions, hidden, _GRU_GATES)
    y, y_h = op.GRU(
        x, weights, recurrent, bias, _sequence_lens(lengths), h0,
        direction="bidirectional" if num_directions == 2 else "forward",
        hidden_size=hidden, linear_before_reset=1,
    )
    return _time_major_out(y), y_h


_PROJ_MESSAGE = (
    "fused_birnn.export: an LSTM with proj_size={proj_size}{where} cannot be exported to ONNX: ONNX's LSTM "
    "operator has no projection (h = W_hr (o * tanh(c)), which the next step reads), and fused_birnn does "
    "not decompose it into a loop. (torch.nn.LSTM's own export of proj_size is no way round: with torch 2.13 "
    "it writes LSTM nodes that onnxruntime refuses to run.) Export an LSTM without proj_size.")


def _static(t, name: str) -> tuple[int, ...]:
    """`t`'s directions / batch / width, where the first and last must be static."""
    shape = tuple(t.shape)
    if not isinstance(shape[0], int) or not isinstance(shape[-1], int):
        raise RuntimeError(f"fused_birnn.export: {name}'s directions and hidden size must be static, got "
                           f"shape {t.shape}")
    return shape


def _gated_weights(params, num_directions: int, hidden: int, gates: tuple[int, ...]):
    """ONNX's `W [D, G*H, I]`, `R [D, G*H, H]` and `B [D, 2*G*H]` (or None without bias) from our `params`
    `(w_ih, w_hh[, b_ih, b_hh])` per direction, the gate blocks permuted into ONNX's order."""
    per_direction = len(params) // num_directions
    rows = op.Constant(value_ints=[k * hidden + j for k in gates for j in range(hidden)])

    def reordered(d: int, kind: int):
        return op.Gather(params[d * per_direction + kind], rows, axis=0)

    weights = _stack([reordered(d, 0) for d in range(num_directions)])
    recurrent = _stack([reordered(d, 1) for d in range(num_directions)])
    bias = None
    if per_direction == 4:  # ONNX's B: [Wb, Rb] per direction
        bias = _stack([op.Concat(reordered(d, 2), reordered(d, 3), axis=0) for d in range(num_directions)])
    return weights, recurrent, bias


def _sequence_lens(lengths):
    return None if lengths is None else op.Cast(lengths, to=6)  # int32


def _time_major_out(y):
    """ONNX's `Y [T, D, B, H]` -> `[T, B, D, H]` -> our `out [T, B, D*H]`: forward half first."""
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def _stack(tensors):
    """`torch.stack(tensors)` in ONNX."""
    axes = op.Constant(value_ints=[0])
    return op.Concat(*[op.Unsqueeze(t, axes) for t in tensors], axis=0)


def onnx_translation_table() -> dict[Callable, Callable]:
    """The translations of fused_birnn's layer ops for `torch.onnx.export(..., custom_translation_table=...)`.

    Example::

        table = {**fused_birnn.export.onnx_translation_table(), **my_own_table}
        torch.onnx.export(model, (x,), custom_translation_table=table)
    """
    ops = torch.ops.fused_birnn
    return {ops.rnn_layer.default: rnn_layer_to_onnx, ops.lstm_layer.default: lstm_layer_to_onnx,
            ops.gru_layer.default: gru_layer_to_onnx}


def _contains_packed(value: Any) -> bool:
    if isinstance(value, PackedSequence):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_packed(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_packed(v) for v in value.values())
    return False


def to_onnx(model: torch.nn.Module, args: tuple[Any, ...] = (), f=None, **kwargs: Any):
    r"""``torch.onnx.export(model, args, f, **kwargs)`` with fused_birnn's layers translated to ONNX ``RNN``,
    ``LSTM`` and ``GRU``.

    Every argument is :func:`torch.onnx.export`'s (the ``dynamo=True`` exporter, its default);
    a ``custom_translation_table`` passed here is merged with ours (yours wins on a clash).

    Returns:
        the :class:`torch.onnx.ONNXProgram` that ``torch.onnx.export`` returns.

    Raises:
        ValueError: ``dynamo=False`` (the TorchScript-based exporter cannot see the custom op), or a
            ``PackedSequence`` among the inputs (pass a padded batch and ``lengths=``).
        NotImplementedError: ``model`` holds a ``fused_birnn.LSTM`` with ``proj_size > 0`` (ONNX's ``LSTM``
            has no projection).
    """
    if not kwargs.get("dynamo", True):
        raise ValueError("fused_birnn.export.to_onnx needs dynamo=True (torch.onnx.export's default); "
                         "for the TorchScript-based exporter convert with fused_birnn.to_torch(model) first")
    if _contains_packed(args) or _contains_packed(kwargs.get("kwargs")):
        raise ValueError("a PackedSequence input cannot be exported to ONNX (unpacking needs the values of "
                         "batch_sizes as sizes, which torch.export cannot trace): pass the padded batch and "
                         "lengths= instead, e.g. pad_packed_sequence(packed) -> (x, lengths), "
                         "model(x, lengths=lengths); ONNX's RNN takes them as sequence_lens")
    projected = [(name, m.proj_size) for name, m in model.named_modules()
                 if isinstance(m, LSTM) and m.proj_size] if isinstance(model, torch.nn.Module) else []
    if projected:
        name, proj_size = projected[0]
        raise NotImplementedError(_PROJ_MESSAGE.format(proj_size=proj_size, where=f" (at {name or '<root>'!r})"))
    table = {**onnx_translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)
