"""`fused_birnn.RNN`: a drop-in `torch.nn.RNN` whose layers run on the fused bidirectional kernels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import BACKENDS, BiRNNLayerFunction, PackedLayer, resolve_backend


class RNN(nn.RNNBase):
    r"""Multi-layer Elman RNN with tanh or ReLU, a drop-in replacement for :class:`torch.nn.RNN`.

    Same constructor, parameters (names, shapes, initialisation), ``state_dict``, inputs, outputs and
    errors as ``torch.nn.RNN``; per layer one GEMM projects the input for all directions and one
    Triton launch runs the forward and the reverse recurrence together (see ``fused_birnn.functional``).

    Args:
        input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional,
        device, dtype: as in :class:`torch.nn.RNN`.
        backend: ``'auto'`` (default): the Triton kernels on CUDA (fp16, bf16, fp32), and on CPU when
            ``TRITON_INTERPRET=1`` was set before import (fp16, fp32, fp64); the pure-PyTorch path
            otherwise. ``'triton'`` insists on the kernels (an error where they cannot run);
            ``'torch'`` always takes the pure-PyTorch path.

    Inputs: input, hx
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first=True``, or ``(L, H_in)``.
        - **hx**: ``(D * num_layers, N, H_out)`` or ``(D * num_layers, H_out)``; zeros if omitted.
          ``hx[2*l]`` starts layer l's forward direction; ``hx[2*l+1]`` is layer l's reverse state
          before it reads the last time step.

    Outputs: output, h_n
        - **output**: ``(L, N, D * H_out)`` (batch first if asked): ``[..., :H_out]`` forward,
          ``[..., H_out:]`` reverse, both aligned with the input's time steps.
        - **h_n**: ``(D * num_layers, N, H_out)``, ordered ``[l0 fwd, l0 rev, l1 fwd, ...]``; the reverse
          entries are the states after reading time step 0.

    Unlike cuDNN, backward works in ``eval()`` mode, gradients are bitwise deterministic, and sequences
    of any length run (T >= 65,536 included).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.nonlinearity = nonlinearity
        self.backend = backend
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self._packed: list[tuple[tuple, PackedLayer] | None] = [None] * num_layers

    def flatten_parameters(self) -> None:
        """No-op: the kernels read the parameters as they are (kept for nn.RNN compatibility)."""

    def _apply(self, fn, recurse=True):
        self._packed = [None] * self.num_layers
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_packed"] = [None] * self.num_layers  # a cache: never pickled
        return state

    def _layer_params(self, layer: int) -> list[tuple[Tensor, ...]]:
        num_directions = 2 if self.bidirectional else 1
        names = self._all_weights[layer * num_directions:(layer + 1) * num_directions]
        return [tuple(getattr(self, n) for n in dir_names) for dir_names in names]

    def _packed_layer(self, layer: int, params: list[tuple[Tensor, ...]]) -> PackedLayer:
        """The layer's packed weights, rebuilt only when a parameter was replaced or changed in place."""
        key = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for ps in params for p in ps)
        cached = self._packed[layer]
        if cached is None or cached[0] != key:
            cached = (key, PackedLayer.from_params(params))
            self._packed[layer] = cached
        return cached[1]

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError("fused_birnn.RNN does not accept PackedSequence yet; pass a padded tensor")
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        num_directions = 2 if self.bidirectional else 1
        batch = input.size(batch_dim)
        if hx is None:
            hx = torch.zeros(self.num_layers * num_directions, batch, self.hidden_size,
                             dtype=input.dtype, device=input.device)
        self.check_forward_args(input, hx, None)
        weight = self._flat_weights[0]
        if hx.dtype != input.dtype:
            raise ValueError(f"hx dtype ({hx.dtype}) does not match input dtype ({input.dtype})")
        for name, t in (("input", input), ("hx", hx)):
            if t.device != weight.device:
                raise RuntimeError(f"{name} is on {t.device} but the RNN's parameters are on {weight.device}; "
                                   f"move one of them (e.g. model.to({t.device}))")
        x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        backend = resolve_backend(self.backend, x.device, x.dtype)

        relu = self.nonlinearity == "relu"
        x = x.contiguous()
        h_n = []
        for layer in range(self.num_layers):
            params = self._layer_params(layer)
            packed = self._packed_layer(layer, params)
            h0 = hx[layer * num_directions:(layer + 1) * num_directions]
            h0 = h0 if h0.stride(-1) == 1 else h0.contiguous()
            flat = [p for ps in params for p in ps]
            x, h_layer = BiRNNLayerFunction.apply(x, h0, packed, relu, backend, *flat)
            h_n.append(h_layer)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        output = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.cat(h_n, 0) if self.num_layers > 1 else h_n[0]
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s
