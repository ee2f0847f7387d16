"""`fused_birnn.RNN`, `LSTM` and `GRU`: drop-ins for `torch.nn.RNN`, `nn.LSTM` and `nn.GRU` whose layers run
on the fused bidirectional kernels. One base class holds everything but the few cell-specific parts
(the state tuple, ATen's function for the cell, the constructor's checks)."""

from __future__ import annotations

import warnings
from typing import overload

import torch
from torch import Tensor, _VF, nn
from torch._C import _functorch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional, tune
from .functional import BACKENDS, autocast_dtype, birnn_layer

# ATen's function per cell (nn.RNNBase's mode names) in torch._VF, what nn.RNN / nn.LSTM / nn.GRU call
_ATEN = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}
# cuDNN, handed our weights (flat per kind, the layout our kernels read, not cuDNN's own), packs them per call
# and warns, advising flatten_parameters(), which here lays them out for our kernels again: backend='auto'
# timed cuDNN with that packing (fused_birnn.tune), so the advice does not apply to calls from this module
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk of memory",
                        category=UserWarning, module=r"fused_birnn\.rnn")


def _lives_in(p: Tensor, buf: Tensor, d: int) -> bool:
    """Whether parameter `p` is exactly slot `d` of `buf`."""
    return (p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and p.storage_offset() == buf[d].storage_offset() and p.shape == buf.shape[1:]
            and p.stride() == buf.stride()[1:] and p.dtype == buf.dtype)


class InputTypeError(TypeError, AttributeError):
    """An input that is neither a Tensor nor a PackedSequence: a TypeError, and also the AttributeError
    that nn.RNN raises for it (from `input.dim()`), so code written against either catches it."""


class StateError(RuntimeError, TypeError, IndexError, AttributeError):
    """A state that nn's class cannot use: an LSTM `hx` that is not `(h_0, c_0)`, two tensors, or a state of
    a PackedSequence input that is not 3-D. A RuntimeError, as our other state errors, and also whichever of
    TypeError, IndexError and AttributeError nn's class raises for it there: that depends on what `hx` holds
    (a Tensor, a 1-tuple, None inside), on whether the input is packed (and sorted) and on the torch
    version, so code written against either catches it."""


class InputDtypeError(ValueError, RuntimeError):
    """An input whose dtype is not the parameters': the ValueError of nn's `check_input`, and also the
    RuntimeError nn.LSTM raises for a PackedSequence (it skips that check and fails in a matmul)."""


class MissingWeightError(TypeError, AttributeError):
    """A weight that is not set (None: deleted and not set again): the TypeError that ATen raises for it
    under nn's classes, and the AttributeError they raise when it is the first weight."""


def _needs_grad(x: Tensor, states: tuple[Tensor, ...], weights: list[Tensor]) -> bool:
    """Whether this call records a graph to differentiate (then a backward follows: training)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(s.requires_grad for s in states)
                                        or any(w.requires_grad for w in weights))


class FusedRNNBase(nn.RNNBase):
    r"""What `fused_birnn.RNN`, `LSTM` and `GRU` share: flat parameter buffers, input and state checks in
    nn's words, the PackedSequence and `lengths=` paths, the choice between nn's own kernel and ours
    (`backend='auto'`: `fused_birnn.tune`), and the stack of `functional.birnn_layer` calls. A cell's state is handled as a tuple, `(h,)` or `(h, c)`;
    the user sees what nn's class takes and returns (a Tensor, or LSTM's `(h, c)`)."""

    def __init__(self, mode: str, *args, backend: str = "auto", **kwargs) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        super().__init__(mode, *args, **kwargs)

    # ------------------------------------------------------------------------------------ parameters

    def flatten_parameters(self) -> None:
        """Make each layer's parameters views of one contiguous buffer per kind, so the kernels read
        them with no per-call copy: `[D*G*H, I]` input weights (one GEMM for all directions and gates),
        `[D, G*H, P]` recurrent weights, `[D*G*H]` biases, `[D, P, H]` projections. Called on construction,
        after `.to()`/`.half()` and after unpickling (not by nn's per-call weight refresh in `_weights`). The
        layer op itself checks, per call, whether a layer's weights still lie back to back (`functional._joined`):
        a parameter replaced later (`rnn.weight_hh_l0 = Parameter(...)`) is concatenated per call instead,
        so results never go stale. Only registered Parameters move: a kind (say both directions' `w_hh`)
        with a weight that is parametrized, pruned, set by a hook or deleted (`_weights`) stays as it is
        and is packed per call, and a layer holding one Parameter under two names is never flattened."""
        if torch.compiler.is_compiling() or self.__dict__.get("_refreshing"):
            # under torch.compile a layout change is not traceable (storage pointers), and nn's per-call weight
            # refresh (`_weights`) changes no Parameter: the layer op packs per call whatever is not flat
            return
        previous = getattr(self, "_layer_buffers", [])
        self._layer_buffers: list[list[Tensor | None]] = []
        if len(getattr(self, "_flat_weights", ())) != len(getattr(self, "_flat_weights_names", (None,))):
            return  # called by nn.RNNBase before all parameters exist
        registered = [self._parameters.get(name) for name in self._flat_weights_names]
        with torch.no_grad():
            for layer in range(self.num_layers):
                params = self._layer_params(layer, registered)
                present = [p for ps in params for p in ps if p is not None]
                movable = (len({id(p) for p in present}) == len(present)  # not one Parameter in two slots
                           and all(p.dtype == present[0].dtype and p.device == present[0].device for p in present))
                old = previous[layer] if layer < len(previous) else None
                buffers = []
                for k, kind in enumerate(zip(*params)):  # (w_ih of each direction), (w_hh ...), ...
                    buf = old[k] if old is not None else None
                    if not movable or any(p is None for p in kind):
                        buf = None
                    elif buf is None or not all(_lives_in(p, buf, d) for d, p in enumerate(kind)):
                        buf = torch.stack([p.detach() for p in kind])  # else still flat (e.g. after
                        for d, p in enumerate(kind):                  # share_memory_(), which moves in place)
                            p.set_(buf.untyped_storage(), buf[d].storage_offset(), buf[d].shape, buf[d].stride())
                    buffers.append(buf)
                self._layer_buffers.append(buffers)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.flatten_parameters()

    def __getstate__(self):
        state = super().__getstate__()  # nn.RNNBase's: without its weakrefs to the flat weights
        state.pop("_tune_memo", None)  # fused_birnn.tune's memo of this process's decisions
        return state

    def _layer_params(self, layer: int, weights: list[Tensor | None] | None = None) -> list[tuple[Tensor, ...]]:
        """Layer `layer`'s weights per direction, in nn's order, out of `weights` (nn's flat order;
        default: `_weights()`, read now)."""
        weights = self._weights() if weights is None else weights
        num_directions = 2 if self.bidirectional else 1
        per_direction = len(weights) // (self.num_layers * num_directions)
        first = layer * num_directions * per_direction
        return [tuple(weights[first + d * per_direction:first + (d + 1) * per_direction])
                for d in range(num_directions)]

    def _weights(self) -> list[Tensor]:
        """Every weight in nn's flat order, as nn's class reads them for this call. Registered Parameters
        (the common case) are read from `_parameters` (a dict lookup each, nothing more: `functional_call`
        swaps entries there). Any other weight (parametrized by `torch.nn.utils.parametrize`: weight and
        spectral norm of `torch.nn.utils.parametrizations`; pruned, or old-style weight or spectral norm:
        a tensor set by a forward pre-hook; weight drop; deleted) is read exactly as nn's forward reads it:
        `_update_flat_weights()`, then `_flat_weights`. That evaluates a parametrization as often as nn's
        class does (spectral norm's power iteration advances alike) and keeps gradients flowing to the
        underlying parameters. Raises `MissingWeightError` for a weight that is not set."""
        params = self._parameters
        try:
            return [params[name] for name in self._flat_weights_names]
        except KeyError:  # not a registered Parameter
            pass
        if torch.compiler.is_compiling():  # torch.compile / export trace each weight once; writing the module's
            weights = [getattr(self, name, None) for name in self._flat_weights_names]  # lists would recompile
        else:
            self.__dict__["_refreshing"] = True  # no flatten_parameters per call (its checks cost 5-10% of a
            try:                                 # small LSTM's forward, measured)
                self._update_flat_weights()
            finally:
                del self.__dict__["_refreshing"]
            weights = list(self._flat_weights)
        self._check_set(weights)
        return weights

    def _check_set(self, weights: list[Tensor | None]) -> None:
        """Raise `MissingWeightError` naming every weight that is None (deleted, e.g. by a weight-drop
        wrapper, and not set again before this call)."""
        missing = [name for name, w in zip(self._flat_weights_names, weights) if w is None]
        if missing:
            raise MissingWeightError(
                f"{type(self).__name__} weight(s) {', '.join(missing)} not set: expected a Tensor for each (a "
                f"deleted weight must be set again before the call, e.g. by a forward pre-hook, as for nn's class)")

    # ---------------------------------------------------------------------- the cell's state, as nn's

    def _state_sizes(self) -> tuple[int, ...]:
        """The last dimension of each state tensor: `(H,)`; LSTM `(P or H, H)`."""
        return (self.hidden_size,)

    def _states(self, hx) -> tuple[Tensor, ...] | None:
        """The user's `hx` as a tuple of state tensors."""
        return None if hx is None else (hx,)

    def _hx(self, states: tuple[Tensor, ...]):
        """A tuple of states as nn's class returns them."""
        return states[0]

    def _check_state_dims(self, states: tuple[Tensor, ...], dims: int) -> None:
        if states[0].dim() != dims:
            kind = "batched 3-D" if dims == 3 else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {dims}-D but got {states[0].dim()}-D tensor")

    @staticmethod
    def _check_packed_state_dims(states: tuple[Tensor, ...]) -> None:
        """nn's classes fail later on a PackedSequence's states that are not 3-D (RuntimeError, IndexError)."""
        if any(s.dim() != 3 for s in states):
            raise StateError("For PackedSequence input, the states should be 3-D (num_layers * num_directions, "
                             f"batch, size) but got {', '.join(f'{s.dim()}-D' for s in states)}")

    def _input_dim_error(self, dim: int) -> str:
        return f"{self.mode}: Expected input to be 2D or 3D, got {dim}D instead"

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input: Tensor | PackedSequence, hx=None, lengths: Tensor | None = None):
        """Run the network; arguments and results as nn's class (`torch.nn.RNN.forward`,
        `nn.LSTM.forward`, `nn.GRU.forward`), plus ``lengths``.

        Args:
            input: ``(L, N, H_in)`` (``(N, L, H_in)`` batch first), unbatched ``(L, H_in)``, or a
                ``PackedSequence`` (then the output is one too, and the final states hold each sequence's
                states at its own last step).
            hx: initial states (LSTM: ``(h_0, c_0)``), zeros if omitted.
            lengths: optional 1-D integer tensor of N valid lengths (1..L) for a padded batched
                ``input``, on the CPU or the input's device: the same results as packing the input,
                without packing (padded output steps are 0). Their values are checked on the host:
                free for CPU lengths, a device sync for device lengths. Under ``torch.compile`` and
                while capturing a CUDA graph (pass device lengths there) they are not checked but
                clamped to [1, L]; check them beforehand.

        Returns:
            ``(output, h_n)``; LSTM ``(output, (h_n, c_n))``.
        """
        weights = self._weights()
        if lengths is None:
            result = self._aten_fast_path(input, hx, weights)
            if result is not None:
                return result
        self._check_set(weights)
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or lengths=, not both")
            return self._forward_packed(input, hx, weights)
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(self._input_dim_error(input.dim()))
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        states = self._states(hx)
        if not is_batched:
            if lengths is not None:
                raise ValueError("lengths= needs a batched 3-D input; got unbatched 2-D input")
            input = input.unsqueeze(batch_dim)
            if states is not None:
                self._check_state_dims(states, 2)
                states = tuple(s.unsqueeze(1) for s in states)
        elif states is not None:
            self._check_state_dims(states, 3)
        states = self._initial_states(input, states, input.size(batch_dim), weights[0])
        self.check_forward_args(input, self._hx(states), None)
        x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:  # ATen's words, which nn's classes raise: "in RNN" for every cell
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is not None:
            lengths = self._check_lengths(lengths, x)
            # padded steps are never read, but would still reach grad W_ih through x (NaN * 0)
            valid = torch.arange(x.size(0), device=x.device)[:, None] < lengths[None, :]
            x = x.masked_fill(~valid[:, :, None], 0)
        output, states = self._run_layers(x, states, lengths, weights)
        output = output.transpose(0, 1) if self.batch_first else output
        if not is_batched:
            output = output.squeeze(batch_dim)
            states = tuple(s.squeeze(1) for s in states)
        return output, self._hx(states)

    def _forward_packed(self, input: PackedSequence, hx, weights: list[Tensor]):
        """PackedSequence in, PackedSequence out, as nn's class: computed in the packed (length-sorted)
        batch order on the padded layout, each row with its own length."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        states = self._states(hx)
        if states is not None:
            self._check_packed_state_dims(states)
            states = self._states(self.permute_hidden(self._hx(states), sorted_indices))  # caller's order -> sorted
        states = self._initial_states(data, states, int(batch_sizes[0]), weights[0], packed=True)
        self.check_forward_args(data, self._hx(states), batch_sizes)
        if data.device != weights[0].device:
            self._raise_device_mismatch(data, weights[0])
        choice = self._choice(data, len(batch_sizes), int(batch_sizes[0]), "packed", states, weights)
        output, states = self._run_packed(choice, data, batch_sizes, states, weights)
        return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                self.permute_hidden(self._hx(states), unsorted_indices))

    def _initial_states(self, input: Tensor, states: tuple[Tensor, ...] | None, batch: int,
                        weight: Tensor, packed: bool = False) -> tuple[Tensor, ...]:
        """`states`, or zeros; checks what nn's class leaves to a later, less clear error (`weight`: the
        first of this call's weights; `packed`: `input` is a PackedSequence's data)."""
        num_directions = 2 if self.bidirectional else 1
        if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():  # nn's check_input, first
            raise (InputDtypeError if packed else ValueError)(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        if states is None:
            return tuple(torch.zeros(self.num_layers * num_directions, batch, size, dtype=input.dtype,
                                     device=input.device) for size in self._state_sizes())
        for name, t in zip(("hx", "cx"), states):
            if t.dtype != input.dtype:  # nn's classes fail later, in a matmul, with a RuntimeError
                raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({input.dtype})")
        for name, t in (("input", input), *zip(("hx", "cx"), states)):
            if t.device != weight.device:
                raise RuntimeError(f"{name} is on {t.device} but the {type(self).__name__}'s parameters are on "
                                   f"{weight.device}; move one of them (e.g. model.to({t.device}))")
        return states

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

    # ------------------------------------------------------------------ what runs: nn's kernel or ours

    def _choice(self, x: Tensor, steps: int, batch: int, rows: str, states: tuple[Tensor, ...],
                weights: list[Tensor]) -> str:
        """What runs this call (`x`: its input, time-major or packed data, `steps` and `batch` its T and B,
        `rows` how its rows end: "" all at T, "packed", "lengths"): the module's `backend` where it is pinned
        ('triton', 'torch'); with 'auto', 'aten' (nn's own kernel for the cell, `torch._VF`: cuDNN on CUDA)
        or a backend of our layers ('torch', 'triton', 'triton:split=S'), chosen by `fused_birnn.tune`
        (measured per call shape, checked against nn's kernel). 'auto' itself where ATen's kernel is no
        candidate (then `functional.resolve_backend` picks as before): the interpreter on a CPU (its
        kernels, as asked), a CPU dtype other than fp32/fp64 or CPU autocast (our semantics), `torch.func`
        transforms (our layer's rules), torch.compile's tracing (our custom ops), other devices."""
        if self.backend != "auto":
            return self.backend
        device = x.device.type
        if device == "cpu":
            if (functional.INTERPRETER or x.dtype not in (torch.float32, torch.float64)
                    or torch.is_autocast_enabled("cpu")):
                return "auto"
        elif device != "cuda" or functional.INTERPRETER:
            return "auto"
        if torch.compiler.is_compiling() or _functorch.maybe_current_level() is not None:
            return "auto"
        return tune.choose(self, x, steps, batch, rows, _needs_grad(x, states, weights), weights)

    def _aten_fast_path(self, input: Tensor | PackedSequence, hx, weights: list[Tensor]):
        """`forward` for the common call that `backend='auto'` hands to nn's own kernel (`_choice`: 'aten';
        a batched CPU fp32/fp64 or CUDA tensor, or a PackedSequence of one, states None or of the expected
        shape, dtype and device, outside autocast, torch.func and torch.compile), with nothing else before
        the kernel: the general path's checks and reshapes cost 1-3% of nn's time at mid-size shapes
        (measured on a CPU, bench/). None for anything else, which the general path then handles (and raises
        nn's errors for)."""
        packed = type(input) is PackedSequence
        data = input.data if packed else input
        if (self.backend != "auto" or type(data) is not Tensor or functional.INTERPRETER
                or data.dim() != (2 if packed else 3) or data.size(-1) != self.input_size):
            return None
        if data.is_cpu:
            if data.dtype not in (torch.float32, torch.float64):
                return None
        elif not data.is_cuda:
            return None
        if packed:
            steps = input.batch_sizes.numel()
            batch = int(input.batch_sizes[0]) if steps else 0
        else:
            steps, batch = (data.size(1), data.size(0)) if self.batch_first else (data.size(0), data.size(1))
        if (steps == 0 or torch._C._is_any_autocast_enabled() or _functorch.maybe_current_level() is not None
                or torch.compiler.is_compiling()):
            return None
        device = data.device
        rows = self.num_layers * (2 if self.bidirectional else 1)
        sizes = self._state_sizes()
        states = () if hx is None else self._states(hx)
        if not (weights[0].device == device and weights[0].dtype == data.dtype and all(
                type(s) is Tensor and s.device == device and s.dtype == data.dtype and s.shape == (rows, batch, size)
                for s, size in zip(states, sizes))):
            return None
        if tune.choose(self, data, steps, batch, "packed" if packed else "", _needs_grad(data, states, weights),
                       weights) != "aten":
            return None
        if hx is None:
            states = tuple(torch.zeros(rows, batch, size, dtype=data.dtype, device=device) for size in sizes)
        aten = getattr(_VF, _ATEN[self.mode])
        common = (weights, self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if not packed:
            result = aten(data, states[0] if len(states) == 1 else states, *common, self.batch_first)
            return result[0], self._hx(tuple(result[1:]))
        if hx is not None:  # the caller's order -> the packed (sorted) order
            states = self._states(self.permute_hidden(self._hx(states), input.sorted_indices))
        result = aten(data, input.batch_sizes, states[0] if len(states) == 1 else states, *common)
        return (PackedSequence(result[0], input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden(self._hx(tuple(result[1:])), input.unsorted_indices))

    def _aten(self, x: Tensor, states: tuple[Tensor, ...], weights: list[Tensor], batch_sizes: Tensor | None = None,
              probe: bool = False):
        """ATen's kernel for the cell on a time-major `x` (or packed data with `batch_sizes`):
        `(output, states)`. `probe`: as a training-mode call without dropout (`fused_birnn.tune`'s probe:
        cuDNN's backward needs training mode, and no random numbers are drawn)."""
        hx = states if self.mode == "LSTM" else states[0]
        common = (weights, self.bias, self.num_layers, 0.0 if probe else self.dropout, probe or self.training,
                  self.bidirectional)
        aten = getattr(_VF, _ATEN[self.mode])
        result = aten(x, hx, *common, False) if batch_sizes is None else aten(x, batch_sizes, hx, *common)
        return result[0], tuple(result[1:])

    def _aten_lengths(self, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor, weights: list[Tensor],
                      probe: bool = False):
        """ATen's packed kernel on a padded time-major `x` with `lengths`: our `lengths=` semantics (padded
        output steps 0, each row's final state at its own last step)."""
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        sorted_states = self._states(self.permute_hidden(self._hx(states), packed.sorted_indices))
        output, sorted_states = self._aten(packed.data, sorted_states, weights, packed.batch_sizes, probe)
        output, _ = pad_packed_sequence(PackedSequence(output, packed.batch_sizes, packed.sorted_indices,
                                                       packed.unsorted_indices), total_length=x.size(0))
        return output, self._states(self.permute_hidden(self._hx(sorted_states), packed.unsorted_indices))

    # -------------------------------------------------------------------------------------- the stack

    def _run_layers(self, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None, weights: list[Tensor],
                    choice: str | None = None):
        """The stack on a time-major `x [T, B, I]` by `choice` (default: `_choice`'s for this call): nn's
        kernel ('aten'), or one `birnn_layer` (two kernel launches with its backward) per layer on that
        backend. Returns `(output [T, B, D*P], states)`."""
        if x.device != weights[0].device:
            self._raise_device_mismatch(x, weights[0])
        if choice is None:
            choice = self._choice(x, x.size(0), x.size(1), "" if lengths is None else "lengths", states, weights)
        return self._run(choice, x, states, lengths, weights)

    def _run_packed(self, choice: str, data: Tensor, batch_sizes: Tensor, states: tuple[Tensor, ...],
                    weights: list[Tensor], probe: bool = False):
        """A PackedSequence's data (in its sorted order) by `choice`: ATen's packed kernel for 'aten', else
        padded (`[T, B, I]`), run through our layers with each row's length, and packed again. Returns
        `(packed output data, states)`."""
        if choice == "aten":
            return self._aten(data, states, weights, batch_sizes, probe)
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))  # [T, B, I], sorted
        output, states = self._run(choice, padded, states, lengths.to(data.device, non_blocking=True), weights,
                                   probe)
        return pack_padded_sequence(output, lengths).data, states

    def _raise_device_mismatch(self, x: Tensor, weight: Tensor):
        raise RuntimeError(f"input is on {x.device} but the {type(self).__name__}'s parameters are on "
                           f"{weight.device}; move one of them (e.g. model.to({x.device}))")

    def _run(self, choice: str, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None,
             weights: list[Tensor], probe: bool = False):
        """The stack on a time-major `x [T, B, I]`: nn's kernel for `choice` 'aten' (`lengths` through its
        packed form), else one `birnn_layer` per layer on backend `choice`, dropout between layers in
        training mode; under autocast the layers run in autocast's dtype, as nn's do. `probe`: as
        `fused_birnn.tune` times and checks a candidate, without dropout. Returns `(output, states)`."""
        if choice == "aten":
            if lengths is None:
                return self._aten(x, states, weights, probe=probe)
            return self._aten_lengths(x, states, lengths, weights, probe)
        dtype = self._autocast_dtype(x, lengths)
        if dtype is not None:  # the weights are cast as the op packs them
            x, states = x.to(dtype), tuple(s.to(dtype) for s in states)
        num_directions = 2 if self.bidirectional else 1
        x = x.contiguous()
        finals = []
        for layer in range(self.num_layers):
            params = [p for ps in self._layer_params(layer, weights) for p in ps]
            rows = slice(layer * num_directions, (layer + 1) * num_directions)
            h0 = states[0][rows]
            c0 = states[1][rows] if self.mode == "LSTM" else None
            x, *layer_states = birnn_layer(self.mode, x, h0, c0, params, lengths, choice)
            finals.append(layer_states)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1 and not probe:
                x = nn.functional.dropout(x, self.dropout, training=True)
        if self.num_layers == 1:
            return x, tuple(finals[0])
        return x, tuple(torch.cat(kind, 0) for kind in zip(*finals))

    def _autocast_dtype(self, x: Tensor, lengths: Tensor | None) -> torch.dtype | None:
        """The dtype the layers run in under `torch.autocast`, or None: where nn's class is cast. On CUDA
        every cell (cuDNN's RNN op is on autocast's list); on a CPU (torch 2.13, measured) the Elman RNN
        always, LSTM for a padded input but not a packed one (so not with `lengths=`, its equivalent), GRU
        never."""
        if x.device.type == "cpu" and (self.mode == "GRU" or (self.mode == "LSTM" and lengths is not None)):
            return None
        return autocast_dtype(x)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def __prepare_scriptable__(self):
        """Called by `torch.jit.script` on every module it compiles: fail here, with the way out, rather
        than deep inside TorchScript's compiler."""
        name = type(self).__name__
        raise RuntimeError(
            f"torch.jit.script cannot compile fused_birnn.{name} (its forward takes PackedSequence and "
            f"dispatches to custom ops in Python, which TorchScript does not support). Script the model after "
            f"model = fused_birnn.to_torch(model), which swaps every fused_birnn module back to torch.nn.{name} "
            f"with the same parameters; or use torch.compile, or fused_birnn.export.to_onnx for ONNX.")


_COMMON_DOC = r"""
    Per layer one GEMM projects the input for all directions and gates and one Triton launch runs the
    forward and the reverse recurrence together (see ``fused_birnn.functional``). Unlike cuDNN, backward
    works in ``eval()`` mode, gradients are bitwise deterministic, and sequences of any length run
    (T >= 65,536 included). ``torch.compile(fullgraph=True)`` traces it with no graph break (each layer is
    one custom operator, its backward another; a ``PackedSequence`` input breaks the graph as
    ``pack_padded_sequence`` does, ``lengths=`` does not), forward and backward can be captured in a CUDA
    graph, and under ``torch.autocast`` the layers run in autocast's dtype, as nn's do (fp32 parameters and
    their gradients stay fp32).

    ``backend``: ``'auto'`` (default): per call shape, whichever of nn's own kernel (cuDNN on CUDA, ATen's on
    a CPU) and ours (the Triton kernels on CUDA, fp16, bf16, fp32; the pure-PyTorch path elsewhere) was
    measured faster on this device, ours only after agreeing with nn's kernel on a probe of the shape
    (``fused_birnn.tune``; ``python -m fused_birnn.tune --show`` lists the decisions); on a CPU with
    ``TRITON_INTERPRET=1`` set before import, the interpreted kernels (fp16, fp32, fp64). ``'triton'``
    insists on the kernels (an error where they cannot run); ``'torch'`` always takes the pure-PyTorch path.

    ``forward(input, hx=None, lengths=None)``: as nn's, plus ``lengths``, a 1-D integer tensor of the N
    valid lengths of a padded batch: the same results as packing it, without packing. ``hx[2*l+1]``
    (``h_0`` and ``c_0`` alike) is layer l's reverse state before it reads the last valid time step; the
    output's ``[..., :P]`` is the forward direction, ``[..., P:]`` the reverse, both aligned with the
    input's time steps.
"""


class RNN(FusedRNNBase):
    __doc__ = r"""Multi-layer Elman RNN with tanh or ReLU, a drop-in replacement for :class:`torch.nn.RNN`:
    same constructor (plus ``backend=``), parameters (names, shapes, initialisation), ``state_dict``,
    inputs, outputs and errors.
""" + _COMMON_DOC

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
        self.nonlinearity = nonlinearity
        super().__init__(mode, *args, backend=backend, **kwargs)
        if self.proj_size:  # nn.RNN lets a positional proj_size through to RNNBase; no RNN projects
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")

    def _input_dim_error(self, dim: int) -> str:
        return f"RNN: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def extra_repr(self) -> str:
        s = nn.RNNBase.extra_repr(self)
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class LSTM(FusedRNNBase):
    __doc__ = r"""Multi-layer LSTM, a drop-in replacement for :class:`torch.nn.LSTM` (``proj_size`` included):
    same constructor (plus ``backend=``), parameters (names, shapes, initialisation), ``state_dict``,
    inputs ``(input, (h_0, c_0))``, outputs ``(output, (h_n, c_n))`` and errors. Gates in nn's row order
    i, f, g, o; ``c' = f*c + i*g``, ``h' = o*tanh(c')``, then ``h' = W_hr h'`` with a projection.
""" + _COMMON_DOC

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__("LSTM", *args, backend=backend, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _states(self, hx) -> tuple[Tensor, ...] | None:
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, Tensor) for t in hx):
            raise StateError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
                             + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        return tuple(hx)

    def _hx(self, states: tuple[Tensor, ...]):
        return states[0], states[1]

    def _check_state_dims(self, states: tuple[Tensor, ...], dims: int) -> None:
        if states[0].dim() != dims or states[1].dim() != dims:
            kind = "batched 3-D" if dims == 3 else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {dims}-D but got "
                               f"({states[0].dim()}-D, {states[1].dim()}-D) tensors")


class GRU(FusedRNNBase):
    __doc__ = r"""Multi-layer GRU, a drop-in replacement for :class:`torch.nn.GRU`: same constructor (plus
    ``backend=``), parameters (names, shapes, initialisation), ``state_dict``, inputs, outputs and errors.
    Gates in nn's row order r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
    ``h' = (1 - z) * n + z * h``.
""" + _COMMON_DOC

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, **kwargs)
