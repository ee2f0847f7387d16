"""ONNX export: each `fused_birnn::rnn_layer` becomes one ONNX `RNN` node (no loop, no unrolled steps).

`torch.onnx.export` (with its default `dynamo=True`) traces a model with
`torch.export`, where `fused_birnn.RNN` calls one custom op per layer; ONNX has no function for that op
unless it is given one. `onnx_translation_table()` is that function, for `torch.onnx.export`'s
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

`lengths=` (ONNX's `sequence_lens`) has our semantics in onnxruntime: padded output steps are 0, each
reverse row starts at its own last valid step and `Y_h` holds each row's state at its own last step
(tests/test_export.py checks this); as under torch.compile, the exported graph clamps them to [1, T]
rather than checking them. A `PackedSequence` input cannot be exported (nor can
`nn.RNN`'s): `torch.export` takes it apart into its tensors, but the batch size and every row's length
are *values* of `batch_sizes`, not shapes, and unpacking needs them as sizes (`batch_sizes[0]` sizes the
batch), which `torch.export` refuses as a data-dependent guard; pass a padded batch with `lengths=`
instead. `backend=` does not apply: the ONNX runtime runs its own RNN kernel. onnxruntime 1.32 runs fp32
(tested) and fp16 (tried once) models but has no fp64 `RNN` kernel: an fp64 model exports and passes
the ONNX checker, and onnxruntime refuses it.

Needs `onnx` and `onnxscript`: the `export` extra, which also brings `onnxruntime`; importing
`fused_birnn` itself does not import them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

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
    sequence_lens = None if lengths is None else op.Cast(lengths, to=6)  # int32
    y, y_h = op.RNN(
        x, *stacked, sequence_lens, h0,
        activations=["Relu" if relu else "Tanh"] * num_directions,
        direction="bidirectional" if num_directions == 2 else "forward",
        hidden_size=hidden,
    )
    # Y [T, D, B, H] -> [T, B, D, H] -> [T, B, D*H]: forward half first, as our out
    out = op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
    return out, y_h


def _stack(tensors):
    """`torch.stack(tensors)` in ONNX."""
    axes = op.Constant(value_ints=[0])
    return op.Concat(*[op.Unsqueeze(t, axes) for t in tensors], axis=0)


def onnx_translation_table() -> dict[Callable, Callable]:
    """The translation of fused_birnn's op for `torch.onnx.export(..., custom_translation_table=...)`.

    Example::

        table = {**fused_birnn.export.onnx_translation_table(), **my_own_table}
        torch.onnx.export(model, (x,), custom_translation_table=table)
    """
    return {torch.ops.fused_birnn.rnn_layer.default: rnn_layer_to_onnx}


def _contains_packed(value: Any) -> bool:
    if isinstance(value, PackedSequence):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_packed(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_packed(v) for v in value.values())
    return False


def to_onnx(model: torch.nn.Module, args: tuple[Any, ...] = (), f=None, **kwargs: Any):
    r"""``torch.onnx.export(model, args, f, **kwargs)`` with fused_birnn's layers translated to ONNX ``RNN``.

    Every argument is :func:`torch.onnx.export`'s (the ``dynamo=True`` exporter, its default);
    a ``custom_translation_table`` passed here is merged with ours (yours wins on a clash).

    Returns:
        the :class:`torch.onnx.ONNXProgram` that ``torch.onnx.export`` returns.

    Raises:
        ValueError: ``dynamo=False`` (the TorchScript-based exporter cannot see the custom op), or a
            ``PackedSequence`` among the inputs (pass a padded batch and ``lengths=``).
    """
    if not kwargs.get("dynamo", True):
        raise ValueError("fused_birnn.export.to_onnx needs dynamo=True (torch.onnx.export's default); "
                         "for the TorchScript-based exporter convert with fused_birnn.to_torch(model) first")
    if _contains_packed(args) or _contains_packed(kwargs.get("kwargs")):
        raise ValueError("a PackedSequence input cannot be exported to ONNX (unpacking needs the values of "
                         "batch_sizes as sizes, which torch.export cannot trace): pass the padded batch and "
                         "lengths= instead, e.g. pad_packed_sequence(packed) -> (x, lengths), "
                         "model(x, lengths=lengths); ONNX's RNN takes them as sequence_lens")
    table = {**onnx_translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)
