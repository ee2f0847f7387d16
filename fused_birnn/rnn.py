"""`fused_birnn.RNN`: a drop-in `torch.nn.RNN` whose layers run on the fused bidirectional kernels."""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor, _VF, nn
from torch._C import _functorch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional
from .functional import BACKENDS, autocast_dtype, birnn_layer

# backend='auto' on a CPU: training on sequences shorter than this runs ATen's own RNN (see
# RNN._aten_serves); measured crossover of forward+backward against nn.RNN, 1 and 2 threads (bench/).
ATEN_MAX_TRAINING_STEPS = 32


def _lives_in(p: Tensor, buf: Tensor, d: int) -> bool:
    """Whether parameter `p` is exactly slot `d` of `buf`."""
    return (p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and p.storage_offset() == buf[d].storage_offset() and p.shape == buf.shape[1:]
            and p.stride() == buf.stride()[1:] and p.dtype == buf.dtype)


class InputTypeError(TypeError, AttributeError):
    """An input that is neither a Tensor nor a PackedSequence: a TypeError, and also the AttributeError
    that nn.RNN raises for it (from `input.dim()`), so code written against either catches it."""


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
    of any length run (T >= 65,536 included). ``torch.compile(fullgraph=True)`` traces it with no graph
    break (each layer is one custom operator, its backward another; a ``PackedSequence`` input breaks
    the graph as ``pack_padded_sequence`` does, ``lengths=`` does not), forward and backward can be
    captured in a CUDA graph, and under ``torch.autocast`` the layers run in autocast's dtype, as nn.RNN's
    do (fp32 parameters and their gradients stay fp32; only cuDNN's nn.RNN runs fp16 under bf16 autocast).
    """

    @overload
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, *, backend: str = "auto") -> None: ...

    @overload
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None: ...

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        # nn.RNN's own argument handling, step for step, so every argument (positional or keyword, valid
        # or not) behaves as there: nonlinearity is taken out, the rest goes to nn.RNNBase unchanged.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
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
        super().__init__(mode, *args, **kwargs)
        if self.proj_size:  # nn.RNN lets a positional proj_size through to RNNBase; no RNN projects
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")

    def flatten_parameters(self) -> None:
        """Make each layer's parameters views of one contiguous buffer per kind, so the kernels read
        them with no per-call copy: `[D*H, I]` input weights (one GEMM for all directions),
        `[D, H, H]` recurrent weights, `[D*H]` biases. Called on construction, after `.to()`/`.half()`
        and after unpickling. The layer op itself checks, per call, whether a layer's parameters still
        lie back to back (`functional._joined`): a parameter replaced later
        (`rnn.weight_hh_l0 = Parameter(...)`) is concatenated per call instead, so results never go
        stale. A layer holding one Parameter under two names is never flattened."""
        previous = getattr(self, "_layer_buffers", [])
        self._layer_buffers: list[list[Tensor] | None] = []
        if len(getattr(self, "_flat_weights", ())) != len(getattr(self, "_flat_weights_names", (None,))):
            return  # called by nn.RNNBase before all parameters exist
        with torch.no_grad():
            for layer in range(self.num_layers):
                params = self._layer_params(layer)
                flat = [p for ps in params for p in ps]
                buffers = previous[layer] if layer < len(previous) else None
                if buffers is not None and all(
                        _lives_in(p, buf, d) for buf, kind in zip(buffers, zip(*params)) for d, p in enumerate(kind)):
                    pass  # still flat (e.g. after share_memory_(), which moves storages in place)
                elif (any(p.dtype != flat[0].dtype or p.device != flat[0].device for p in flat)
                      or len({id(p) for p in flat}) != len(flat)):  # one Parameter in two slots
                    buffers = None
                else:
                    buffers = []
                    for kind in zip(*params):  # (w_ih of each direction), (w_hh ...), ...
                        buf = torch.stack([p.detach() for p in kind])
                        for d, p in enumerate(kind):
                            p.set_(buf.untyped_storage(), buf[d].storage_offset(), buf[d].shape, buf[d].stride())
                        buffers.append(buf)
                self._layer_buffers.append(buffers)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.flatten_parameters()

    def _layer_params(self, layer: int) -> list[tuple[Tensor, ...]]:
        num_directions = 2 if self.bidirectional else 1
        names = self._all_weights[layer * num_directions:(layer + 1) * num_directions]
        return [tuple(getattr(self, n) for n in dir_names) for dir_names in names]

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths: Tensor | None = None):
        """Run the RNN; arguments and results as :meth:`torch.nn.RNN.forward`, plus ``lengths``.

        Args:
            input: ``(L, N, H_in)`` (``(N, L, H_in)`` batch first), unbatched ``(L, H_in)``, or a
                ``PackedSequence`` (then the output is one too, and ``h_n`` holds each sequence's
                states at its own last step).
            hx: initial states, zeros if omitted.
            lengths: optional 1-D integer tensor of N valid lengths (1..L) for a padded batched
                ``input``, on the CPU or the input's device: the same results as packing the input,
                without packing (padded output steps are 0). Their values are checked on the host:
                free for CPU lengths, a device sync for device lengths. Under ``torch.compile`` and
                while capturing a CUDA graph (pass device lengths there) they are not checked but
                clamped to [1, L]; check them beforehand.

        Returns:
            ``(output, h_n)``.
        """
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or lengths=, not both")
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            if lengths is not None:
                raise ValueError("lengths= needs a batched 3-D input; got unbatched 2-D input")
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        hx = self._initial_state(input, hx, input.size(batch_dim))
        self.check_forward_args(input, hx, None)
        x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is not None:
            lengths = self._check_lengths(lengths, x)
            # padded steps are never read, but would still reach grad W_ih through x (NaN * 0)
            valid = torch.arange(x.size(0), device=x.device)[:, None] < lengths[None, :]
            x = x.masked_fill(~valid[:, :, None], 0)
        output, h_n = self._run_layers(x, hx, lengths)
        output = output.transpose(0, 1) if self.batch_first else output
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n

    def _forward_packed(self, input: PackedSequence, hx: Tensor | None) -> tuple[PackedSequence, Tensor]:
        """PackedSequence in, PackedSequence out, as nn.RNN: computed in the packed (length-sorted)
        batch order on the padded layout, each row with its own length."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)  # the caller's order -> sorted
        hx = self._initial_state(data, hx, int(batch_sizes[0]))
        self.check_forward_args(data, hx, batch_sizes)
        if self._aten_serves(data, hx, len(batch_sizes)):
            weights = self._current_weights()
            output, h_n = (_VF.rnn_relu if self.nonlinearity == "relu" else _VF.rnn_tanh)(
                data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                self.bidirectional)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                h_n, unsorted_indices)
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))  # [T, B, I], sorted
        output, h_n = self._run_layers(padded, hx, lengths.to(data.device, non_blocking=True))
        output = pack_padded_sequence(output, lengths).data
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
            h_n, unsorted_indices)

    def _initial_state(self, input: Tensor, hx: Tensor | None, batch: int) -> Tensor:
        """`hx`, or zeros; checks what nn.RNN leaves to a later, less clear error."""
        num_directions = 2 if self.bidirectional else 1
        if hx is None:
            return torch.zeros(self.num_layers * num_directions, batch, self.hidden_size,
                               dtype=input.dtype, device=input.device)
        if hx.dtype != input.dtype:  # nn.RNN fails later, in a matmul, with a RuntimeError
            raise RuntimeError(f"hx dtype ({hx.dtype}) does not match input dtype ({input.dtype})")
        weight = self._flat_weights[0]
        for name, t in (("input", input), ("hx", hx)):
            if t.device != weight.device:
                raise RuntimeError(f"{name} is on {t.device} but the RNN's parameters are on {weight.device}; "
                                   f"move one of them (e.g. model.to({t.device}))")
        return hx

    @staticmethod
    def _check_lengths(lengths: Tensor, x: Tensor) -> Tensor:
        """Validate `lengths` for a time-major `x` and return it as int64 on x's device. The value check
        needs the values on the host: free for CPU lengths, a sync for device lengths; under torch.compile
        and CUDA-graph capture it is skipped (validate beforehand) and the values are clamped to [1, T]."""
        T, B = x.shape[:2]
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if lengths.dim() != 1 or lengths.numel() != B:
            raise ValueError(f"lengths must be a 1-D tensor of the batch size {B}, got shape {tuple(lengths.shape)}")
        if lengths.device.type != "cpu" and lengths.device != x.device:
            raise ValueError(f"lengths must be on the CPU or on the input's device ({x.device}), got {lengths.device}")
        if (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or (lengths.is_cuda and torch.cuda.is_current_stream_capturing())):
            lengths = lengths.clamp(1, T)  # values cannot be read while tracing or capturing: keep them in range
        else:  # a sync for device lengths: pass CPU lengths
            values = lengths
            while _functorch.is_functorch_wrapped_tensor(values):  # torch.func.vmap: every sample's lengths
                values = _functorch.get_unwrapped(values)
            if values.numel() and (values.min() < 1 or values.max() > T):
                raise ValueError(f"lengths must lie in [1, {T}] (the padded sequence length), got values from "
                                 f"{int(values.min())} to {int(values.max())}")
        return lengths.to(device=x.device, dtype=torch.int64, non_blocking=True)

    def _current_weights(self) -> list[Tensor]:
        """Every parameter in nn.RNN's flat order, read now (`functional_call` swaps entries of
        `_parameters`; a dict lookup costs a fraction of `getattr` on a Module)."""
        return [self._parameters[name] for name in self._flat_weights_names]

    def _aten_serves(self, x: Tensor, hx: Tensor, steps: int) -> bool:
        """Whether `backend='auto'` hands this call to ATen's own RNN (`torch._VF.rnn_tanh`/`rnn_relu`, what
        nn.RNN runs on a CPU): on a CPU without the interpreter, in plain eager fp32/fp64 without autocast,
        for inference (our per-layer Python costs more than the recurrence saves: measured 0.6-1.0x of
        nn.RNN) and for training on short sequences (`steps < ATEN_MAX_TRAINING_STEPS`, where our
        hand-written BPTT has too few steps to repay that cost). Everything else runs our path: training
        on longer sequences (1.2-3x nn.RNN, README), `lengths=`, and torch.func transforms. Same results
        either way: ATen's CPU RNN is deterministic, differentiable to any order and has no length limit."""
        if (self.backend != "auto" or x.device.type != "cpu" or functional.INTERPRETER
                or x.dtype not in (torch.float32, torch.float64)
                or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or _functorch.maybe_current_level() is not None):  # torch.func: our layer's rules
            return False
        if steps < ATEN_MAX_TRAINING_STEPS or not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or hx.requires_grad or any(p.requires_grad for p in self._current_weights()))

    def _run_layers(self, x: Tensor, hx: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """The stack on a time-major `x [T, B, I]`: one `birnn_layer` (two kernel launches with its
        backward) per layer, dropout between layers in training mode. Under autocast the layers run in
        autocast's dtype, as nn.RNN's do. Returns `(output [T, B, D*H], h_n)`."""
        if x.device != self._flat_weights[0].device:
            raise RuntimeError(f"input is on {x.device} but the RNN's parameters are on "
                               f"{self._flat_weights[0].device}; move one of them (e.g. model.to({x.device}))")
        if lengths is None and self._aten_serves(x, hx, x.size(0)):
            return (_VF.rnn_relu if self.nonlinearity == "relu" else _VF.rnn_tanh)(
                x, hx, self._current_weights(), self.bias, self.num_layers, self.dropout, self.training,
                self.bidirectional, False)
        dtype = autocast_dtype(x)
        if dtype is not None:  # the weights are cast as the op packs them
            x, hx = x.to(dtype), hx.to(dtype)
        num_directions = 2 if self.bidirectional else 1
        relu = self.nonlinearity == "relu"
        x = x.contiguous()
        h_n = []
        for layer in range(self.num_layers):
            params = [p for ps in self._layer_params(layer) for p in ps]
            h0 = hx[layer * num_directions:(layer + 1) * num_directions]
            x, h_layer = birnn_layer(x, h0, params, lengths, relu, self.backend)
            h_n.append(h_layer)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        return x, torch.cat(h_n, 0) if self.num_layers > 1 else h_n[0]

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def __prepare_scriptable__(self):
        """Called by `torch.jit.script` on every module it compiles: fail here, with the way out, rather
        than deep inside TorchScript's compiler."""
        raise RuntimeError(
            "torch.jit.script cannot compile fused_birnn.RNN (its forward takes PackedSequence and "
            "dispatches to custom ops in Python, which TorchScript does not support). Script the model after "
            "model = fused_birnn.to_torch(model), which swaps every fused_birnn.RNN back to torch.nn.RNN with "
            "the same parameters; or use torch.compile, or fused_birnn.export.to_onnx for ONNX.")
