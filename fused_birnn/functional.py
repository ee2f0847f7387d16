"""One layer (all its directions) of any cell as PyTorch custom operators, and the backend dispatch.

`birnn_layer(cell, x, h0, c0, params, lengths, backend)` runs a layer of `cell` (nn.RNNBase's mode names:
'RNN_TANH', 'RNN_RELU', 'LSTM', 'GRU') with D directions (D = 2 bidirectional) and G gates (1, 4, 3);
`params` are the layer's parameters in nn's order, `(w_ih, w_hh[, b_ih, b_hh][, w_hr]) * D` (`w_hr`: an
LSTM with `proj_size`, P its width, else P = H):

    x_proj = x @ [W_ih_0; W_ih_1]^T + folded biases                         one GEMM, [T*B, D*G*H]
    out, h_n[, c_n][, saved] = recurrence(x_proj, W_hh [D, G*H, P], h0, ...) one launch, both directions

(folded biases: b_ih + b_hh; for GRU b_ih + [b_hr, b_hz, 0], b_hn stays inside r * (...) and goes to the
recurrence apart.) Its backward:

    grad_pre, grad_h0, ... = recurrence backward(out, grad_out, grad_h_n, W_hh, saved, ...)   one launch
    grad_x      = grad_pre @ W_ih_cat                                       one GEMM
    grad_W_ih   = grad_pre^T @ x                                            one GEMM
    grad_W_hh_d = hid_d[1:]^T @ out_d[:-1] + hid_d[0]^T @ h0_d              (reverse: mirrored in time,
                                                                           h0 entering at each row's end)
    grad_b_ih   = grad_pre summed over (T, B);   grad_b_hh = hid summed
    grad_W_hr   = from the recurrence (sum over steps of g^T (o * tanh c))

where `hid`, the gradient of the hidden side's pre-activations, is `grad_pre` except for GRU's n block
(the gradient of `W_hn h + b_hn`, returned by the recurrence as `grad_hn`).

Each cell is one pair of `torch.library.custom_op`s (`torch.ops.fused_birnn.rnn_layer` / `lstm_layer` /
`gru_layer` and their `*_backward`), thin typed entry points over the one implementation
(`_layer_forward`, `_layer_backward`), opaque to torch.compile (a model traces with no graph break; the
compiled forward and backward graphs call them), with fake implementations for tracing. A gated cell's
op also returns `saved`, what its backward reads (torch_backend's module docstring), as a
non-differentiable output. Eager mode calls the same implementations through a plain
autograd.Function, skipping the custom-op dispatcher's per-call Python cost. Being opaque
lets them decide per call, from the storage, whether the per-direction weights already lie back to back
(the modules keep them in flat buffers): then `W_ih_cat`, `W_hh` and the biases are views, else a
concatenation. (A `triton_op` would be traced instead: storage pointers cannot be read while tracing,
and the PyTorch path's Python loop over time would be unrolled into the graph.) Weights of another
dtype than `x` (the module casts only `x` and the states under autocast) are cast while packing, and
their gradients cast back by the autograd formula.

The recurrence is the Triton kernels (`fused_birnn.kernels`) or the pure-PyTorch path
(`fused_birnn.torch_backend`), chosen per call by `resolve_backend`; both honour the same buffers, so
everything else is shared. fp32 kernels use TF32 where `torch.backends.cudnn.allow_tf32` is set when
each op runs. No op reads a device value on the host: forward and backward are CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import os
from typing import Optional  # custom_op schemas: older torch does not read `Tensor | None`

import torch
from torch import Tensor
from torch._C import _functorch

from . import torch_backend
from .kernels import backward as kernel_backward
from .kernels import config as kernel_config
from .kernels import forward as kernel_forward
from .kernels import launch as kernel_launch

BACKENDS = ("auto", "triton", "torch")
# Read at import like Triton does (it decides at decoration time whether kernels are interpreted).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
TRITON_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# bf16 arithmetic is wrong in the interpreter (NOTES-triton.md 3): it only runs these.
TRITON_INTERPRETER_DTYPES = (torch.float16, torch.float32, torch.float64)


# `backend='auto'`'s tuner (fused_birnn.tune) names a kernel plan other than the planner's by its split: the
# layer ops take "triton:split=S" (S cooperating programs per group) as their backend, forward and backward alike
SPLIT_PLAN = "triton:split="


def plan_split(backend: str) -> int | None:
    """S of a "triton:split=S" backend (the tuner's choice of plan), None for any other backend."""
    if not backend.startswith(SPLIT_PLAN):
        return None
    value = backend[len(SPLIT_PLAN):]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"backend {backend!r}: expected {SPLIT_PLAN}S with S a positive integer")
    return int(value)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which recurrence runs: 'triton' (the kernels, every cell; compiled on CUDA, interpreted on CPU under
    TRITON_INTERPRET=1), a tuned kernel plan ('triton:split=S', `plan_split`) or 'torch'. 'auto' takes the
    kernels wherever they can run this dtype."""
    if plan_split(backend) is not None:  # the kernels with a given split: where the kernels can run
        resolve_backend("triton", device, dtype)
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "cuda" and not INTERPRETER:
        kernel_dtypes = TRITON_CUDA_DTYPES
    elif device.type == "cpu" and INTERPRETER:
        kernel_dtypes = TRITON_INTERPRETER_DTYPES
    else:
        kernel_dtypes = ()
    if backend == "auto":
        return "triton" if dtype in kernel_dtypes else "torch"
    if backend == "triton" and dtype not in kernel_dtypes:
        if not kernel_dtypes:
            where = ("CPU tensors need TRITON_INTERPRET=1 set before fused_birnn is imported"
                     if device.type == "cpu" else
                     f"{device.type} tensors are not supported by the Triton kernels"
                     if device.type != "cuda" else
                     "CUDA tensors cannot run while TRITON_INTERPRET=1 is set")
            raise RuntimeError(f"backend='triton' cannot run here: {where}; use backend='torch' or 'auto'")
        raise RuntimeError(
            f"backend='triton' supports {', '.join(str(d) for d in kernel_dtypes)} on {device.type} "
            f"(interpreter: {INTERPRETER}), got {dtype}; use backend='torch' or 'auto'")
    return backend


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a layer runs in under `torch.autocast` for x's device, or None (autocast off, or x not
    eligible: as for autocast's own casts, only floating tensors other than float64 are cast)."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


SMALL_JOIN = 4096  # elements: below this, copying is cheaper than proving adjacency (CPU, per call)


def _joined(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """`torch.cat(tensors)` in `dtype`, without a copy where the tensors already lie back to back in
    memory inside the first one's storage (the module's flat buffers): then a view of that storage.
    (Storages never overlap, so adjacency within the first's storage means one storage.)"""
    first = tensors[0]
    if len(tensors) == 1:
        return first.contiguous().to(dtype)
    if first.numel() * len(tensors) <= SMALL_JOIN:
        return torch.cat(tensors).to(dtype)
    size = first.numel() * first.element_size()
    base = first.data_ptr()
    if (all(t.data_ptr() == base + d * size and t.dtype == first.dtype and t.shape == first.shape
            and t.is_contiguous() for d, t in enumerate(tensors))
            and first.untyped_storage().nbytes() >= first.storage_offset() * first.element_size()
            + len(tensors) * size):
        n = len(tensors) * first.shape[0]
        joined = first.as_strided((n, *first.shape[1:]), (first.stride(0) if first.dim() > 1 else 1,
                                                         *first.stride()[1:]))
    else:
        joined = torch.cat(tensors)
    return joined.to(dtype)


def _parameters(cell: str, params: list[Tensor], num_directions: int, dtype: torch.dtype,
                *wanted: str) -> list[Tensor | None]:
    """The `wanted` kinds of a layer's parameters, every direction joined (`_joined`) in `dtype`:
    "w_ih" `[D*G*H, I]`, "w_hh" `[D, G*H, P]`, "w_hr" `[D, P, H]` (None without a projection), "bias" the
    biases folded into the input projection `[D*G*H]` (b_ih + b_hh; for GRU b_ih + [b_hr, b_hz, 0]; None
    without biases), "b_hn" GRU's `[D, H]` (None otherwise)."""
    per_direction = len(params) // num_directions
    kinds = torch_backend.parameter_kinds(cell, per_direction)

    def joined(kind: str) -> Tensor | None:
        return _joined(params[kinds.index(kind)::per_direction], dtype) if kind in kinds else None

    found = []
    for kind in wanted:
        if kind == "w_hh":
            w_hh = joined("w_hh")
            found.append(w_hh.view(num_directions, -1, w_hh.shape[-1]))
        elif kind == "w_hr":
            w_hr = joined("w_hr")
            found.append(None if w_hr is None else w_hr.view(num_directions, -1, w_hr.shape[-1]))
        elif kind == "bias" and cell == "GRU" and "b_ih" in kinds:
            bias = joined("b_ih").clone().view(num_directions, 3, -1)
            bias[:, :2] += joined("b_hh").view(num_directions, 3, -1)[:, :2]  # b_hn stays inside r * (...)
            found.append(bias.view(-1))
        elif kind == "bias":
            found.append(joined("b_ih") + joined("b_hh") if "b_ih" in kinds else None)
        elif kind == "b_hn":
            found.append(joined("b_hh").view(num_directions, 3, -1)[:, 2].contiguous()
                         if cell == "GRU" and "b_ih" in kinds else None)
        else:
            found.append(joined(kind))
    return found


def _outside_autocast(fn):
    """Run `fn` with autocast off for its inputs' device: the module has chosen the dtype the layer runs
    in (`FusedRNNBase._autocast_dtype`: nn's own choice, which can be fp32 under autocast), and autocast
    must not recast the layer's GEMMs to another."""
    @functools.wraps(fn)
    def run(cell, *args):
        device = args[0].device.type
        if not torch.is_autocast_enabled(device):
            return fn(cell, *args)
        with torch.autocast(device, enabled=False):
            return fn(cell, *args)
    return run


@_outside_autocast
def _layer_forward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
                   lengths: Optional[Tensor], backend: str) -> tuple[Tensor, ...]:
    """One layer of `cell`, all directions (the module docstring): `x [T, B, I]`, `h0 [D, B, P]`, `c0 [D, B, H]`
    (LSTM), `params` per direction in nn's order, optional `lengths [B]` (int64 on x's device, values in
    [1, T]). Returns `torch_backend.recurrence_forward`'s tuple: Elman `(out, h_n)`, LSTM
    `(out, h_n, c_n, saved)`, GRU `(out, h_n, saved)`; `out [T, B, D*P]` is 0 at padded steps."""
    T, B, I = x.shape
    D = h0.shape[0]
    backend = resolve_backend(backend, x.device, x.dtype)
    w_ih, w_hh, bias, b_hn, w_hr = _parameters(cell, params, D, x.dtype, "w_ih", "w_hh", "bias", "b_hn", "w_hr")
    x2 = x.reshape(T * B, I)
    x_proj = (x2 @ w_ih.t() if bias is None else torch.addmm(bias, x2, w_ih.t())).view(T, B, w_ih.shape[0])
    h0, c0 = h0.contiguous(), None if c0 is None else c0.contiguous()
    if backend != "torch":  # the kernels: the planner's plan, or the tuner's split
        allow_tf32 = torch.backends.cudnn.allow_tf32
        return kernel_forward.recurrence_forward(x_proj, w_hh, h0, c0, w_hr, b_hn, cell=cell, lengths=lengths,
                                                 allow_tf32=allow_tf32,
                                                 config=_tuned_plan(backend, cell, w_hh, B, x.dtype, allow_tf32,
                                                                    x.device, w_hr is not None))
    return torch_backend.recurrence_forward(x_proj, w_hh, h0, c0, w_hr, b_hn, cell=cell, lengths=lengths)


@_outside_autocast
def _layer_backward(cell: str, grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], x: Tensor,
                    h0: Tensor, c0: Optional[Tensor], out: Tensor, saved: Optional[Tensor], params: list[Tensor],
                    lengths: Optional[Tensor], backend: str, input_grad: bool, weight_grads: bool) -> list[Tensor]:
    """Gradients of `_layer_forward` (its arguments, its `out` and `saved`, and the gradients of its
    outputs): `[grad_h0]`, `grad_c0` (LSTM), `grad_x` if `input_grad`, then if `weight_grads`
    `grad_w_ih [D*G*H, I]`, `grad_w_hh [D, G*H, P]`, with biases `grad_b_ih`, `grad_b_hh [D*G*H]`, with a
    projection `grad_w_hr [D, P, H]`; all in x's dtype. The weight gradients are GEMMs over all steps
    after the recurrence's backward."""
    T, B, I = x.shape
    D, _, P = h0.shape
    backend = resolve_backend(backend, x.device, x.dtype)
    w_hh, w_hr = _parameters(cell, params, D, x.dtype, "w_hh", "w_hr")
    w_ih = _parameters(cell, params, D, x.dtype, "w_ih")[0] if input_grad else None
    GH = w_hh.shape[1]
    recurrence = torch_backend.recurrence_backward
    if backend != "torch":  # the forward's plan (the same arguments give the same plan)
        allow_tf32 = torch.backends.cudnn.allow_tf32
        recurrence = functools.partial(kernel_backward.recurrence_backward, allow_tf32=allow_tf32,
                                       config=_tuned_plan(backend, cell, w_hh, B, x.dtype, allow_tf32, x.device,
                                                          w_hr is not None))
    result = recurrence(_last_contiguous(out), _last_contiguous(grad_out), _last_contiguous(grad_h_n), w_hh,
                        cell=cell, lengths=lengths, saved=saved, h0=h0.contiguous(),
                        c0=None if c0 is None else c0.contiguous(),
                        grad_c_n=None if grad_c_n is None else grad_c_n.contiguous(), w_hr=w_hr)
    grad_pre, grad_h0 = result[:2]
    grads = [grad_h0] + ([result[2]] if cell == "LSTM" else [])
    gp2 = grad_pre.view(T * B, D * GH)
    if input_grad:
        grads.append((gp2 @ w_ih).view(T, B, I))
    if weight_grads:
        hidden = grad_pre  # the gradient of the hidden side's pre-activations, h @ W_hh^T (+ b_hh)
        if cell == "GRU":  # its n block is the gradient of W_hn h + b_hn
            hidden = grad_pre.clone()
            hidden.view(T, B, D, 3, GH // 3)[:, :, :, 2] = result[2].view(T, B, D, GH // 3)
        grad_w_hh = torch.empty_like(w_hh)
        for d in range(D):
            gp_d, out_d = hidden[..., d * GH:(d + 1) * GH], out[..., d * P:(d + 1) * P]
            if d == 0:  # h_{t-1} of step t is out[t-1], h0 at t = 0
                later, earlier, first = gp_d[1:], out_d[:-1], gp_d[0]
            else:  # the reverse direction's previous state is out[t+1] (0 past a row's end),
                # h0 at the row's last valid step
                later, earlier = gp_d[:-1], out_d[1:]
                first = gp_d[T - 1] if lengths is None else gp_d[lengths - 1, torch.arange(B, device=x.device)]
            torch.mm(first.t(), h0[d], out=grad_w_hh[d])
            if T > 1:
                grad_w_hh[d].addmm_(later.reshape(-1, GH).t(), earlier.reshape(-1, P))
        grads += [gp2.t() @ x.reshape(T * B, I), grad_w_hh]
        if len(params) // D in (4, 5):  # biases (a projected LSTM has 3 or 5 per direction)
            grads += [grad_pre.sum((0, 1)), hidden.sum((0, 1))]
        if w_hr is not None:
            grads.append(result[3])
    return grads


def _tuned_plan(backend: str, cell: str, w_hh: Tensor, B: int, dtype: torch.dtype, allow_tf32: bool,
                device: torch.device, proj: bool):
    """The kernels' plan for a "triton:split=S" backend: the planner's best plan with S programs per group
    (`kernels.config.select_config`'s `split`, as `FUSED_BIRNN_SPLIT=S` asks); None (the kernels plan
    themselves) for "triton", or where `FUSED_BIRNN_SPLIT` is set (the user's split wins)."""
    split = plan_split(backend)
    if split is None or kernel_launch.split_override() is not None:
        return None
    G = torch_backend.gate_count(cell)
    H, P = w_hh.shape[1] // G, w_hh.shape[2]
    return kernel_config.select_config(H, B, dtype, allow_tf32, kernel_config.device_limits(device), split,
                                       None if G == 1 else cell, P if proj else None)


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _elman(relu: bool) -> str:
    return "RNN_RELU" if relu else "RNN_TANH"


# ------------------------------------------------------------------------- the custom operators, per cell

def layer_forward(x: Tensor, h0: Tensor, params: list[Tensor], lengths: Optional[Tensor], relu: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """An Elman layer (tanh, or ReLU): `(out [T, B, D*H], h_n [D, B, H])`; see `_layer_forward`."""
    return _layer_forward(_elman(relu), x, h0, None, params, lengths, backend)


def lstm_layer_forward(x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], lengths: Optional[Tensor],
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An LSTM layer: `(out [T, B, D*P], h_n [D, B, P], c_n [D, B, H], saved)`; see `_layer_forward`."""
    return _layer_forward("LSTM", x, h0, c0, params, lengths, backend)


def gru_layer_forward(x: Tensor, h0: Tensor, params: list[Tensor], lengths: Optional[Tensor],
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """A GRU layer: `(out [T, B, D*H], h_n [D, B, H], saved)`; see `_layer_forward`."""
    return _layer_forward("GRU", x, h0, None, params, lengths, backend)


def layer_backward(grad_out: Tensor, grad_h_n: Tensor, x: Tensor, h0: Tensor, out: Tensor, params: list[Tensor],
                   lengths: Optional[Tensor], relu: bool, backend: str, input_grad: bool,
                   weight_grads: bool) -> list[Tensor]:
    """Gradients of `rnn_layer`; see `_layer_backward`."""
    return _layer_backward(_elman(relu), grad_out, grad_h_n, None, x, h0, None, out, None, params, lengths,
                           backend, input_grad, weight_grads)


def lstm_layer_backward(grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                        out: Tensor, saved: Tensor, params: list[Tensor], lengths: Optional[Tensor], backend: str,
                        input_grad: bool, weight_grads: bool) -> list[Tensor]:
    """Gradients of `lstm_layer`; see `_layer_backward`."""
    return _layer_backward("LSTM", grad_out, grad_h_n, grad_c_n, x, h0, c0, out, saved, params, lengths,
                           backend, input_grad, weight_grads)


def gru_layer_backward(grad_out: Tensor, grad_h_n: Tensor, x: Tensor, h0: Tensor, out: Tensor, saved: Tensor,
                       params: list[Tensor], lengths: Optional[Tensor], backend: str, input_grad: bool,
                       weight_grads: bool) -> list[Tensor]:
    """Gradients of `gru_layer`; see `_layer_backward`."""
    return _layer_backward("GRU", grad_out, grad_h_n, None, x, h0, None, out, saved, params, lengths, backend,
                           input_grad, weight_grads)


rnn_layer = torch.library.custom_op("fused_birnn::rnn_layer", mutates_args=())(layer_forward)
lstm_layer = torch.library.custom_op("fused_birnn::lstm_layer", mutates_args=())(lstm_layer_forward)
gru_layer = torch.library.custom_op("fused_birnn::gru_layer", mutates_args=())(gru_layer_forward)
rnn_layer_backward = torch.library.custom_op("fused_birnn::rnn_layer_backward", mutates_args=())(layer_backward)
lstm_layer_backward_op = torch.library.custom_op("fused_birnn::lstm_layer_backward",
                                                 mutates_args=())(lstm_layer_backward)
gru_layer_backward_op = torch.library.custom_op("fused_birnn::gru_layer_backward",
                                                mutates_args=())(gru_layer_backward)


def _fake_forward(cell: str, x: Tensor, h0: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    T, B, _ = x.shape
    D, _, P = h0.shape
    GH = params[0].shape[0]
    H = GH // torch_backend.gate_count(cell)
    state = [x.new_empty((D, B, P))] + ([x.new_empty((D, B, H))] if cell == "LSTM" else [])
    saved = torch_backend.saved_shape(cell, T, B, D, H)
    return (x.new_empty((T, B, D * P)), *state) + (() if saved is None else (x.new_empty(saved),))


def _fake_backward(cell: str, x: Tensor, h0: Tensor, params: list[Tensor], input_grad: bool,
                   weight_grads: bool) -> list[Tensor]:
    T, B, I = x.shape
    D, _, P = h0.shape
    GH = params[0].shape[0]
    H = GH // torch_backend.gate_count(cell)
    kinds = torch_backend.parameter_kinds(cell, len(params) // D)
    grads = [x.new_empty((D, B, P))] + ([x.new_empty((D, B, H))] if cell == "LSTM" else [])
    grads += [x.new_empty((T, B, I))] if input_grad else []
    if weight_grads:
        grads += [x.new_empty((D * GH, I)), x.new_empty((D, GH, P))]
        grads += [x.new_empty((D * GH,)), x.new_empty((D * GH,))] if "b_ih" in kinds else []
        grads += [x.new_empty((D, P, H))] if "w_hr" in kinds else []
    return grads


rnn_layer.register_fake(lambda x, h0, params, lengths, relu, backend: _fake_forward(_elman(relu), x, h0, params))
lstm_layer.register_fake(lambda x, h0, c0, params, lengths, backend: _fake_forward("LSTM", x, h0, params))
gru_layer.register_fake(lambda x, h0, params, lengths, backend: _fake_forward("GRU", x, h0, params))
rnn_layer_backward.register_fake(
    lambda grad_out, grad_h_n, x, h0, out, params, lengths, relu, backend, input_grad, weight_grads:
    _fake_backward(_elman(relu), x, h0, params, input_grad, weight_grads))
lstm_layer_backward_op.register_fake(
    lambda grad_out, grad_h_n, grad_c_n, x, h0, c0, out, saved, params, lengths, backend, input_grad, weight_grads:
    _fake_backward("LSTM", x, h0, params, input_grad, weight_grads))
gru_layer_backward_op.register_fake(
    lambda grad_out, grad_h_n, x, h0, out, saved, params, lengths, backend, input_grad, weight_grads:
    _fake_backward("GRU", x, h0, params, input_grad, weight_grads))


def _backward_ops(cell, grad_out, grad_h_n, grad_c_n, x, h0, c0, out, saved, params, lengths, backend,
                  input_grad, weight_grads):
    """`_layer_backward` through the cell's backward op (what torch.compile's backward graph records)."""
    if cell == "LSTM":
        return lstm_layer_backward_op(grad_out, grad_h_n, grad_c_n, x, h0, c0, out, saved, params, lengths,
                                      backend, input_grad, weight_grads)
    if cell == "GRU":
        return gru_layer_backward_op(grad_out, grad_h_n, x, h0, out, saved, params, lengths, backend, input_grad,
                                     weight_grads)
    return rnn_layer_backward(grad_out, grad_h_n, x, h0, out, params, lengths, cell == "RNN_RELU", backend,
                              input_grad, weight_grads)


# ------------------------------------------------------------------------------------------------ autograd

def _save(ctx, cell: str, x, h0, c0, params, lengths, backend, output) -> None:
    """What every layer's backward needs: the inputs, `out`, and a gated cell's `saved` (an output that is
    not differentiable)."""
    saved = output[-1] if cell in ("LSTM", "GRU") else None
    if saved is not None:
        ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(x, h0, c0, output[0], saved, lengths, *params)
    ctx.cell, ctx.backend = cell, backend


def _transformed(*tensors: Tensor | None) -> bool:
    """Whether a tensor is a `torch.func` or `is_grads_batched` wrapper: it has no storage, so no kernel
    (nor the PyTorch path's `out=` ops) can read it."""
    return any(t is not None and (_functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t))
               for t in tensors)


def _gradients(ctx, grad_out, grad_h_n, grad_c_n, need_x: bool, need_h0: bool, need_c0: bool, need_params: bool,
               backward_fn):
    """`(grad_x, grad_h0, grad_c0, grad_params)` of a layer saved by `_save`: through `backward_fn` (the
    backward ops, or `_layer_backward` called directly in eager mode), or, where that cannot serve, by
    differentiating a recomputation (`_recomputed_gradients`)."""
    x, h0, c0, out, saved, lengths, *params = ctx.saved_tensors
    if c0 is not None and grad_c_n is None:
        grad_c_n = torch.zeros_like(c0)
    if torch.is_grad_enabled() or _transformed(grad_out, grad_h_n, grad_c_n, *ctx.saved_tensors):
        return _recomputed_gradients(ctx, grad_out, grad_h_n, grad_c_n, need_x, need_h0, need_c0, need_params)
    grads = list(backward_fn(ctx.cell, grad_out, grad_h_n, grad_c_n, x, h0, c0, out, saved, params, lengths,
                             ctx.backend, need_x, need_params))
    grad_h0 = grads.pop(0)
    grad_c0 = grads.pop(0) if c0 is not None else None
    grad_x = grads.pop(0) if need_x else None
    grad_params = [None] * len(params)
    if need_params:  # per-parameter views of the joined gradients, in each parameter's dtype (autocast)
        D = h0.shape[0]
        kinds = torch_backend.parameter_kinds(ctx.cell, len(params) // D)
        joined = dict(zip(["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"] if "b_ih" in kinds else ["w_ih", "w_hh", "w_hr"],
                          grads))
        rows = joined["w_ih"].shape[0] // D
        grad_params = []
        for d in range(D):
            for kind in kinds:
                g = joined[kind]
                grad_params.append(g[d] if kind in ("w_hh", "w_hr") else g[d * rows:(d + 1) * rows])
        grad_params = [g.to(p.dtype) for g, p in zip(grad_params, params, strict=True)]
    return grad_x, grad_h0 if need_h0 else None, grad_c0 if need_c0 else None, grad_params


def _recomputed_gradients(ctx, grad_out, grad_h_n, grad_c_n, need_x: bool, need_h0: bool, need_c0: bool,
                          need_params: bool):
    """The layer's gradients as autograd's gradients of `torch_backend.differentiable_layer` recomputed
    from the saved inputs: for a gradient that is itself differentiated (`create_graph=True`: grad mode is
    on in backward; the result stays connected to the saved inputs, so double backward, gradient
    penalties and `gradgradcheck` are exact), batched (`is_grads_batched=True`) or transformed
    (`torch.func`). Costs one more forward and the composite's backward; ordinary backward never comes
    here."""
    x, h0, c0, _, _, lengths, *params = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    inputs = [x, h0, c0, *params]
    wanted = [need_x, need_h0, need_c0 and c0 is not None] + [need_params] * len(params)
    if create_graph:  # differentiated in place: only what requires grad (a frozen parameter gets None)
        wanted = [w and t.requires_grad for w, t in zip(wanted, inputs)]
    with torch.enable_grad():
        if not create_graph:  # differentiate a fresh graph of its own
            inputs = [t if t is None else t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
        outputs = torch_backend.differentiable_layer(inputs[0], inputs[1], inputs[3:], lengths, cell=ctx.cell,
                                                     c0=inputs[2])
        chosen = [t for t, w in zip(inputs, wanted) if w]
        upstream = (grad_out, grad_h_n, grad_c_n)[:len(outputs)]
        found = iter(torch.autograd.grad(outputs, chosen, upstream, create_graph=create_graph, allow_unused=True))
    grads = [next(found) if w else None for w in wanted]
    return grads[0], grads[1], grads[2], grads[3:]


def _rnn_setup_context(ctx, inputs, output):
    x, h0, params, lengths, relu, backend = inputs
    _save(ctx, _elman(relu), x, h0, None, params, lengths, backend, output)


def _rnn_backward(ctx, grad_out, grad_h_n):
    need = ctx.needs_input_grad
    grad_x, grad_h0, _, grad_params = _gradients(ctx, grad_out, grad_h_n, None, need[0], need[1], False,
                                                 any(need[2]), _backward_ops)
    return grad_x, grad_h0, grad_params, None, None, None


def _lstm_setup_context(ctx, inputs, output):
    x, h0, c0, params, lengths, backend = inputs
    _save(ctx, "LSTM", x, h0, c0, params, lengths, backend, output)


def _lstm_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_saved):
    need = ctx.needs_input_grad
    grad_x, grad_h0, grad_c0, grad_params = _gradients(ctx, grad_out, grad_h_n, grad_c_n, need[0], need[1], need[2],
                                                       any(need[3]), _backward_ops)
    return grad_x, grad_h0, grad_c0, grad_params, None, None


def _gru_setup_context(ctx, inputs, output):
    x, h0, params, lengths, backend = inputs
    _save(ctx, "GRU", x, h0, None, params, lengths, backend, output)


def _gru_backward(ctx, grad_out, grad_h_n, _grad_saved):
    need = ctx.needs_input_grad
    grad_x, grad_h0, _, grad_params = _gradients(ctx, grad_out, grad_h_n, None, need[0], need[1], False,
                                                 any(need[2]), _backward_ops)
    return grad_x, grad_h0, grad_params, None, None


rnn_layer.register_autograd(_rnn_backward, setup_context=_rnn_setup_context)
lstm_layer.register_autograd(_lstm_backward, setup_context=_lstm_setup_context)
gru_layer.register_autograd(_gru_backward, setup_context=_gru_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The same layer for eager mode: the op implementations called directly, without the custom-op
    dispatcher (about 100 us of Python per layer and call: as much as a whole small layer costs).
    `setup_context` and `vmap` make it usable under `torch.func` transforms."""

    @staticmethod
    def forward(x, h0, c0, lengths, cell, backend, *params):
        return _layer_forward(cell, x, h0, c0, list(params), lengths, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, lengths, cell, backend, *params = inputs
        _save(ctx, cell, x, h0, c0, params, lengths, backend, output)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, *rest):
        need = ctx.needs_input_grad
        grad_c_n = rest[0] if ctx.cell == "LSTM" else None
        grad_x, grad_h0, grad_c0, grad_params = _gradients(ctx, grad_out, grad_h_n, grad_c_n, need[0], need[1],
                                                           need[2], any(need[6:]), _layer_backward)
        return grad_x, grad_h0, grad_c0, None, None, None, *grad_params

    @staticmethod
    def vmap(info, in_dims, x, h0, c0, lengths, cell, backend, *params):
        """`torch.func.vmap` over an Elman layer's inputs, states or lengths: the V samples become V*B rows
        of one batch, one launch as before. Over parameters (per-sample weights), under another transform
        (a `torch.func.grad` outside this vmap), or for a gated cell (whose `saved` output has no batch
        dimension to name): the composite layer, batched by vmap itself."""
        x_dim, h0_dim, c0_dim, len_dim, _, _, *param_dims = in_dims
        V = info.batch_size
        if cell in ("LSTM", "GRU") or any(d is not None for d in param_dims) or _transformed(x, h0, lengths, *params):
            def one(x, h0, c0, lengths, *params):
                return torch_backend.differentiable_layer(x, h0, list(params), lengths, cell=cell, c0=c0)
            outputs = torch.vmap(one, in_dims=(x_dim, h0_dim, c0_dim, len_dim, *param_dims))(x, h0, c0, lengths,
                                                                                              *params)
            if cell in ("LSTM", "GRU"):  # no `saved`: nothing reaches this Function's backward
                return (*outputs, x.new_empty(0)), (0,) * len(outputs) + (None,)
            return outputs, (0,) * len(outputs)
        x = x.movedim(x_dim, 1) if x_dim is not None else x.unsqueeze(1).expand(-1, V, -1, -1)
        T, _, B, I = x.shape
        h0 = h0.movedim(h0_dim, 1) if h0_dim is not None else h0.unsqueeze(1).expand(-1, V, -1, -1)
        if lengths is not None:
            lengths = lengths.movedim(len_dim, 0) if len_dim is not None else lengths.expand(V, B)
            lengths = lengths.reshape(V * B)
        out, h_n = _EagerLayer.apply(x.reshape(T, V * B, I), h0.reshape(h0.shape[0], V * B, -1), None, lengths,
                                     cell, backend, *params)
        return (out.view(T, V, B, -1), h_n.view(h_n.shape[0], V, B, -1)), (1, 1)


def birnn_layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
                lengths: Optional[Tensor], backend: str) -> tuple[Tensor, ...]:
    """One layer of `cell` (`torch_backend.CELLS`), differentiable: `(out, h_n)`, for LSTM `(out, h_n, c_n)`.
    The cell's custom op while torch.compile traces (no graph break), the same implementation through a
    plain autograd.Function in eager mode."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # torch.compile, torch.export, jit.trace
        if cell == "LSTM":
            return lstm_layer(x, h0, c0, params, lengths, backend)[:3]
        if cell == "GRU":
            return gru_layer(x, h0, params, lengths, backend)[:2]
        return rnn_layer(x, h0, params, lengths, cell == "RNN_RELU", backend)
    if any(t is not None and _functorch.is_gradtrackingtensor(t) for t in (x, h0, c0, lengths, *params)):
        # torch.func.grad / vjp / jacrev / hessian: plain differentiable ops, exact to any order
        return torch_backend.differentiable_layer(x, h0, params, lengths, cell=cell, c0=c0)
    gated = cell in ("LSTM", "GRU")
    if _transformed(x, h0, c0, lengths, *params):  # torch.func.vmap
        if gated:  # vmap batches the composite's ops
            return torch_backend.differentiable_layer(x, h0, params, lengths, cell=cell, c0=c0)
        return _EagerLayer.apply(x, h0, c0, lengths, cell, backend, *params)  # the Function's vmap rule
    if not torch.is_grad_enabled() or not (x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)
                                           or any(p.requires_grad for p in params)):
        outputs = _layer_forward(cell, x, h0, c0, params, lengths, backend)  # inference: no graph to record
    else:
        outputs = _EagerLayer.apply(x, h0, c0, lengths, cell, backend, *params)
    return outputs[:-1] if gated else outputs
