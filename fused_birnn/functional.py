"""One RNN layer (all its directions) as two PyTorch custom operators, and the backend dispatch.

`birnn_layer(x, h0, params, lengths, relu, backend)` runs a layer with D directions
(D = 2 bidirectional); `params` are the layer's parameters as `nn.RNN` names them,
`(w_ih, w_hh[, b_ih, b_hh]) * D`:

    x_proj = x @ [W_ih_0; W_ih_1]^T + [b_ih_0 + b_hh_0; b_ih_1 + b_hh_1]     one GEMM, [T*B, D*H]
    out, h_n = recurrence(x_proj, W_hh [D, H, H], h0 [D, B, H])             one launch, both directions

Its backward:

    grad_pre, grad_h0 = recurrence backward(out, grad_out, grad_h_n, W_hh) one launch, both directions
    grad_x      = grad_pre @ W_ih_cat                                       one GEMM
    grad_W_ih   = grad_pre^T @ x                                            one GEMM
    grad_W_hh_d = grad_pre_d[1:]^T @ out_d[:-1] + grad_pre_d[0]^T @ h0_d    (reverse: mirrored in time,
                                                                           h0 entering at each row's end)
    grad_b      = grad_pre summed over (T, B)                               (b_ih and b_hh alike)

Both are `torch.library.custom_op`s (`torch.ops.fused_birnn.rnn_layer`, `.rnn_layer_backward`), opaque
to torch.compile (a model traces with no graph break; the compiled forward and backward graphs call
them), with fake implementations for tracing. Eager mode calls the same two implementations through a
plain autograd.Function, skipping the custom-op dispatcher's per-call Python cost. Being opaque
lets them decide per call, from the storage, whether the per-direction weights already lie back to back
(`fused_birnn.RNN` keeps them in flat buffers): then `W_ih_cat`, `W_hh` and the biases are views, else a
concatenation. (A `triton_op` would be traced instead: storage pointers cannot be read while tracing,
and the PyTorch path's Python loop over time would be unrolled into the graph.) Weights of another
dtype than `x` (the module casts only `x` and `hx` under autocast) are cast while packing, and their
gradients cast back by the autograd formula.

The recurrence is the Triton kernels (`fused_birnn.kernels`) or the pure-PyTorch path
(`fused_birnn.torch_backend`), chosen per call by `resolve_backend`; both honour the same buffers, so
everything else is shared. fp32 kernels use TF32 where `torch.backends.cudnn.allow_tf32` is set when
each op runs. No op reads a device value on the host: forward and backward are CUDA-graph capturable.
"""

from __future__ import annotations

import os
from typing import Optional  # custom_op schemas: older torch does not read `Tensor | None`

import torch
from torch import Tensor
from torch._C import _functorch

from . import torch_backend
from .kernels.backward import birnn_backward
from .kernels.forward import birnn_forward

BACKENDS = ("auto", "triton", "torch")
# Read at import like Triton does (it decides at decoration time whether kernels are interpreted).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
TRITON_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# bf16 arithmetic is wrong in the interpreter (NOTES-triton.md 3): it only runs these.
TRITON_INTERPRETER_DTYPES = (torch.float16, torch.float32, torch.float64)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which recurrence runs: 'triton' (the kernels; compiled on CUDA, interpreted on CPU under
    TRITON_INTERPRET=1) or 'torch'. 'auto' takes the kernels wherever they can run this dtype."""
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


def _weights(params: list[Tensor], num_directions: int, dtype: torch.dtype, kind: int) -> Tensor:
    """One kind (0 w_ih, 1 w_hh, 2 b_ih, 3 b_hh) of every direction, joined along dim 0."""
    return _joined(params[kind::len(params) // num_directions], dtype)


def layer_forward(x: Tensor, h0: Tensor, params: list[Tensor], lengths: Optional[Tensor], relu: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """One layer, all directions: `x [T, B, I]`, `h0 [D, B, H]`, `params` `(w_ih, w_hh[, b_ih, b_hh]) * D`,
    optional per-row `lengths [B]` (int64 on x's device, values in [1, T]), tanh or ReLU, a backend
    of `BACKENDS`. Returns `(out [T, B, D*H], h_n [D, B, H])`; with lengths, `out` is 0 at padded steps."""
    T, B, I = x.shape
    D, _, H = h0.shape
    backend = resolve_backend(backend, x.device, x.dtype)
    w_ih, w_hh = _weights(params, D, x.dtype, 0), _weights(params, D, x.dtype, 1).view(D, H, H)
    x2 = x.reshape(T * B, I)
    if len(params) == 4 * D:
        x_proj = torch.addmm(_weights(params, D, x.dtype, 2) + _weights(params, D, x.dtype, 3), x2, w_ih.t())
    else:
        x_proj = x2 @ w_ih.t()
    x_proj = x_proj.view(T, B, D * H)
    h0 = h0.contiguous()
    if backend == "triton":
        out = torch.empty_like(x_proj) if lengths is None else torch.zeros_like(x_proj)
        h_n = x.new_empty((D, B, H))
        birnn_forward(x_proj, w_hh, h0, out, h_n, relu=relu, lengths=lengths,
                      allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        out, h_n = torch_backend.recurrence_forward(x_proj, w_hh, h0, relu=relu, lengths=lengths)
    return out, h_n


rnn_layer = torch.library.custom_op("fused_birnn::rnn_layer", mutates_args=())(layer_forward)


@rnn_layer.register_fake
def _(x, h0, params, lengths, relu, backend):
    T, B, _ = x.shape
    D, _, H = h0.shape
    return x.new_empty((T, B, D * H)), x.new_empty((D, B, H))


def layer_backward(grad_out: Tensor, grad_h_n: Tensor, x: Tensor, h0: Tensor, out: Tensor,
                   params: list[Tensor], lengths: Optional[Tensor], relu: bool, backend: str,
                   input_grad: bool, weight_grads: bool) -> list[Tensor]:
    """Gradients of `rnn_layer` (arguments as there, plus its `out` and the gradients of its outputs):
    `[grad_h0]`, then `grad_x` if `input_grad`, then if `weight_grads` `grad_w_ih [D*H, I]`,
    `grad_w_hh [D, H, H]` and, with biases, `grad_b [D*H]` (of b_ih and b_hh alike), all in x's dtype."""
    T, B, I = x.shape
    D, _, H = h0.shape
    backend = resolve_backend(backend, x.device, x.dtype)
    w_hh = _weights(params, D, x.dtype, 1).view(D, H, H)
    h0 = h0.contiguous()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_h_n = grad_h_n if grad_h_n.stride(-1) == 1 else grad_h_n.contiguous()
    if backend == "triton":
        grad_pre = torch.empty_like(out) if lengths is None else torch.zeros_like(out)
        grad_h0 = x.new_empty((D, B, H))
        birnn_backward(out, grad_out, grad_h_n, w_hh, grad_pre, grad_h0, relu=relu, lengths=lengths,
                       allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        grad_pre, grad_h0 = torch_backend.recurrence_backward(out, grad_out, grad_h_n, w_hh, relu=relu,
                                                              lengths=lengths)
    grads = [grad_h0]
    gp2 = grad_pre.view(T * B, D * H)
    if input_grad:
        grads.append((gp2 @ _weights(params, D, x.dtype, 0)).view(T, B, I))
    if weight_grads:
        grad_w_hh = torch.empty_like(w_hh)
        for d in range(D):
            cols = slice(d * H, (d + 1) * H)
            gp_d, out_d = grad_pre[..., cols], out[..., cols]
            if d == 0:  # h_{t-1} of step t is out[t-1], h0 at t = 0
                later, earlier, first = gp_d[1:], out_d[:-1], gp_d[0]
            else:  # the reverse direction's previous state is out[t+1] (0 past a row's end),
                # h0 at the row's last valid step
                later, earlier = gp_d[:-1], out_d[1:]
                first = gp_d[T - 1] if lengths is None else gp_d[lengths - 1, torch.arange(B, device=x.device)]
            torch.mm(first.t(), h0[d], out=grad_w_hh[d])
            if T > 1:
                grad_w_hh[d].addmm_(later.reshape(-1, H).t(), earlier.reshape(-1, H))
        grads += [gp2.t() @ x.reshape(T * B, I), grad_w_hh]
        if len(params) == 4 * D:
            grads.append(grad_pre.sum((0, 1)))
    return grads


rnn_layer_backward = torch.library.custom_op("fused_birnn::rnn_layer_backward", mutates_args=())(layer_backward)


@rnn_layer_backward.register_fake
def _(grad_out, grad_h_n, x, h0, out, params, lengths, relu, backend, input_grad, weight_grads):
    T, B, I = x.shape
    D, _, H = h0.shape
    grads = [x.new_empty((D, B, H))] + ([x.new_empty((T, B, I))] if input_grad else [])
    if weight_grads:
        grads += [x.new_empty((D * H, I)), x.new_empty((D, H, H))] + (
            [x.new_empty((D * H,))] if len(params) == 4 * D else [])
    return grads


def _setup_context(ctx, inputs, output):
    x, h0, params, lengths, relu, backend = inputs
    ctx.save_for_backward(x, h0, output[0], lengths, *params)
    ctx.relu, ctx.backend = relu, backend


def _transformed(*tensors: Tensor | None) -> bool:
    """Whether a tensor is a `torch.func` or `is_grads_batched` wrapper: it has no storage, so no kernel
    (nor the PyTorch path's `out=` ops) can read it."""
    return any(t is not None and (_functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t))
               for t in tensors)


def _gradients(ctx, grad_out, grad_h_n, need_x: bool, need_h0: bool, need_params: bool, backward_fn):
    """`(grad_x, grad_h0, grad_params)` of a layer saved by `_setup_context`: through `backward_fn` (the
    backward op, or its implementation called directly in eager mode), or, where that cannot serve, by
    differentiating a recomputation (`_recomputed_gradients`)."""
    if torch.is_grad_enabled() or _transformed(grad_out, grad_h_n, *ctx.saved_tensors):
        return _recomputed_gradients(ctx, grad_out, grad_h_n, need_x, need_h0, need_params)
    x, h0, out, lengths, *params = ctx.saved_tensors
    grad_h0, *grads = backward_fn(grad_out, grad_h_n, x, h0, out, params, lengths, ctx.relu, ctx.backend,
                                  need_x, need_params)
    grad_x = grads.pop(0) if need_x else None
    grad_params = [None] * len(params)
    if need_params:  # per-parameter views of the joined gradients, in each parameter's dtype (autocast)
        D, H = h0.shape[0], h0.shape[2]
        grad_w_ih, grad_w_hh, *grad_b = grads
        grad_params = []
        for d in range(D):
            rows = slice(d * H, (d + 1) * H)
            # b_ih and b_hh get the same gradient, in two tensors (in-place accumulation stays separate)
            biases = [grad_b[0][rows], grad_b[0][rows].clone()] if grad_b else []
            grad_params += [grad_w_ih[rows], grad_w_hh[d], *biases]
        grad_params = [g.to(p.dtype) for g, p in zip(grad_params, params, strict=True)]
    return grad_x, grad_h0 if need_h0 else None, grad_params


def _recomputed_gradients(ctx, grad_out, grad_h_n, need_x: bool, need_h0: bool, need_params: bool):
    """The layer's gradients as autograd's gradients of `torch_backend.differentiable_layer` recomputed
    from the saved inputs: for a gradient that is itself differentiated (`create_graph=True`: grad mode is
    on in backward; the result stays connected to the saved inputs, so double backward, gradient
    penalties and `gradgradcheck` are exact), batched (`is_grads_batched=True`) or transformed
    (`torch.func`). Costs one more forward and the composite's backward; ordinary backward never comes
    here."""
    x, h0, _, lengths, *params = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    inputs = [x, h0, *params]
    wanted = [need_x, need_h0] + [need_params] * len(params)
    if create_graph:  # differentiated in place: only what requires grad (a frozen parameter gets None)
        wanted = [w and t.requires_grad for w, t in zip(wanted, inputs)]
    with torch.enable_grad():
        if not create_graph:  # differentiate a fresh graph of its own
            inputs = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
        out, h_n = torch_backend.differentiable_layer(inputs[0], inputs[1], inputs[2:], lengths, relu=ctx.relu)
        chosen = [t for t, w in zip(inputs, wanted) if w]
        found = iter(torch.autograd.grad((out, h_n), chosen, (grad_out, grad_h_n), create_graph=create_graph,
                                         allow_unused=True))
    grads = [next(found) if w else None for w in wanted]
    return grads[0], grads[1], grads[2:]


def _backward(ctx, grad_out, grad_h_n):
    need_x, need_h0, need_params = ctx.needs_input_grad[:3]
    grad_x, grad_h0, grad_params = _gradients(ctx, grad_out, grad_h_n, need_x, need_h0, any(need_params),
                                              rnn_layer_backward)
    return grad_x, grad_h0, grad_params, None, None, None


rnn_layer.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The same layer for eager mode: the op implementations called directly, without the custom-op
    dispatcher (about 100 us of Python per layer and call: as much as a whole small layer costs).
    `setup_context` and `vmap` make it usable under `torch.func` transforms."""

    @staticmethod
    def forward(x, h0, lengths, relu, backend, *params):
        return layer_forward(x, h0, list(params), lengths, relu, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, lengths, relu, backend, *params = inputs
        _setup_context(ctx, (x, h0, params, lengths, relu, backend), output)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        need = ctx.needs_input_grad
        grad_x, grad_h0, grad_params = _gradients(ctx, grad_out, grad_h_n, need[0], need[1], any(need[5:]),
                                                  layer_backward)
        return grad_x, grad_h0, None, None, None, *grad_params

    @staticmethod
    def vmap(info, in_dims, x, h0, lengths, relu, backend, *params):
        """`torch.func.vmap` over inputs, states or lengths: the V samples become V*B rows of one batch,
        one launch as before. Over parameters (per-sample weights), or under another transform (a
        `torch.func.grad` outside this vmap): the composite layer, batched by vmap itself."""
        x_dim, h0_dim, len_dim, _, _, *param_dims = in_dims
        V = info.batch_size
        if any(d is not None for d in param_dims) or _transformed(x, h0, lengths, *params):
            def one(x, h0, lengths, *params):
                return torch_backend.differentiable_layer(x, h0, list(params), lengths, relu=relu)
            return torch.vmap(one, in_dims=(x_dim, h0_dim, len_dim, *param_dims))(x, h0, lengths, *params), (0, 0)
        x = x.movedim(x_dim, 1) if x_dim is not None else x.unsqueeze(1).expand(-1, V, -1, -1)
        T, _, B, I = x.shape
        h0 = h0.movedim(h0_dim, 1) if h0_dim is not None else h0.unsqueeze(1).expand(-1, V, -1, -1)
        if lengths is not None:
            lengths = lengths.movedim(len_dim, 0) if len_dim is not None else lengths.expand(V, B)
            lengths = lengths.reshape(V * B)
        out, h_n = _EagerLayer.apply(x.reshape(T, V * B, I), h0.reshape(h0.shape[0], V * B, -1), lengths,
                                     relu, backend, *params)
        return (out.view(T, V, B, -1), h_n.view(h_n.shape[0], V, B, -1)), (1, 1)


def birnn_layer(x: Tensor, h0: Tensor, params: list[Tensor], lengths: Optional[Tensor], relu: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    """One layer, differentiable: the `fused_birnn::rnn_layer` op while torch.compile traces (no graph
    break), the same implementation through a plain autograd.Function in eager mode."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # torch.compile, torch.export, jit.trace
        return rnn_layer(x, h0, params, lengths, relu, backend)
    if any(t is not None and _functorch.is_gradtrackingtensor(t) for t in (x, h0, lengths, *params)):
        # torch.func.grad / vjp / jacrev / hessian: plain differentiable ops, exact to any order
        return torch_backend.differentiable_layer(x, h0, params, lengths, relu=relu)
    if _transformed(x, h0, lengths, *params):  # torch.func.vmap: the Function's vmap rule
        return _EagerLayer.apply(x, h0, lengths, relu, backend, *params)
    if not torch.is_grad_enabled() or not (x.requires_grad or h0.requires_grad
                                           or any(p.requires_grad for p in params)):
        return layer_forward(x, h0, params, lengths, relu, backend)  # inference: no graph to record
    return _EagerLayer.apply(x, h0, lengths, relu, backend, *params)
