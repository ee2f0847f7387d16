"""One RNN layer (all its directions) as a `torch.autograd.Function`, and the backend dispatch.

Forward of a layer with D directions (D = 2 bidirectional):

    x_proj = x @ [W_ih_0; W_ih_1]^T + [b_ih_0 + b_hh_0; b_ih_1 + b_hh_1]     one GEMM, [T*B, D*H]
    out, h_n = recurrence(x_proj, W_hh [D, H, H], h0 [D, B, H])             one launch, both directions

Backward:

    grad_pre, grad_h0 = recurrence backward(out, grad_out, grad_h_n, W_hh) one launch, both directions
    grad_x      = grad_pre @ W_ih_cat                                       one GEMM
    grad_W_ih   = grad_pre^T @ x                                            one GEMM
    grad_W_hh_d = grad_pre_d[1:]^T @ out_d[:-1] + grad_pre_d[0]^T @ h0_d    (reverse: mirrored in time,
                                                                           h0 entering at each row's end)
    grad_b      = grad_pre summed over (T, B)                               (b_ih and b_hh alike)

The recurrence is the Triton kernels (`fused_birnn.kernels`) or the pure-PyTorch path
(`fused_birnn.torch_backend`); both honour the same buffers, so everything else is shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class PackedLayer:
    """A layer's weights in the layout the kernels read, built once and reused while the parameters
    are unchanged (`fused_birnn.RNN` keys it on the parameters' identity, storage and version).

    Attributes:
        w_ih: `[D*H, I]` input weights of all directions, stacked (one GEMM).
        w_hh: `[D, H, H]` contiguous recurrent weights.
        bias: `[D*H]` `b_ih + b_hh` of all directions, or None.
    """

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    bias: torch.Tensor | None

    @staticmethod
    @torch.no_grad()
    def from_params(params: list[tuple[torch.Tensor, ...]]) -> PackedLayer:
        """`params[d] = (w_ih, w_hh[, b_ih, b_hh])` per direction, as in nn.RNN."""
        w_ih = torch.cat([p[0] for p in params]) if len(params) > 1 else params[0][0].contiguous()
        w_hh = torch.stack([p[1] for p in params]).contiguous()
        bias = None
        if len(params[0]) == 4:
            bias = torch.cat([p[2] + p[3] for p in params])
        return PackedLayer(w_ih.detach(), w_hh.detach(), bias)


class BiRNNLayerFunction(torch.autograd.Function):
    """Autograd of one layer. Inputs: `x [T, B, I]`, `h0 [D, B, H]`, the packed weights (what is
    computed with), the cell, the backend, optional per-row `lengths [B]` (on x's device), then the
    layer's parameters flat, `(w_ih, w_hh[, b_ih, b_hh]) * D` (what gradients are returned for).
    Outputs `(out [T, B, D*H], h_n [D, B, H])`; with lengths, `out` is 0 at padded steps."""

    @staticmethod
    def forward(ctx, x, h0, packed: PackedLayer, relu: bool, backend: str, lengths, *params):
        T, B, _ = x.shape
        D, _, H = packed.w_hh.shape
        x2 = x.reshape(T * B, x.shape[2])
        if packed.bias is not None:
            x_proj = torch.addmm(packed.bias, x2, packed.w_ih.t())
        else:
            x_proj = x2 @ packed.w_ih.t()
        x_proj = x_proj.view(T, B, D * H)
        allow_tf32 = torch.backends.cudnn.allow_tf32
        if backend == "triton":
            out = torch.empty_like(x_proj) if lengths is None else torch.zeros_like(x_proj)
            h_n = torch.empty((D, B, H), dtype=x.dtype, device=x.device)
            birnn_forward(x_proj, packed.w_hh, h0, out, h_n, relu=relu, lengths=lengths, allow_tf32=allow_tf32)
        else:
            out, h_n = torch_backend.recurrence_forward(x_proj, packed.w_hh, h0, relu=relu, lengths=lengths)
        ctx.save_for_backward(x, h0, out, packed.w_ih, packed.w_hh, lengths)
        ctx.relu, ctx.backend, ctx.allow_tf32 = relu, backend, allow_tf32
        ctx.num_params = len(params)
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, h0, out, w_ih, w_hh, lengths = ctx.saved_tensors
        T, B, I = x.shape
        D, _, H = w_hh.shape
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        grad_h_n = grad_h_n if grad_h_n.stride(-1) == 1 else grad_h_n.contiguous()
        if ctx.backend == "triton":
            grad_pre = torch.empty_like(out) if lengths is None else torch.zeros_like(out)
            grad_h0 = torch.empty_like(h0)
            birnn_backward(out, grad_out, grad_h_n, w_hh, grad_pre, grad_h0, relu=ctx.relu, lengths=lengths,
                           allow_tf32=ctx.allow_tf32)
        else:
            grad_pre, grad_h0 = torch_backend.recurrence_backward(out, grad_out, grad_h_n, w_hh, relu=ctx.relu,
                                                                  lengths=lengths)

        needs = ctx.needs_input_grad
        gp2 = grad_pre.view(T * B, D * H)
        grad_x = (gp2 @ w_ih).view(T, B, I) if needs[0] else None
        grad_params: list[torch.Tensor | None] = []
        per_dir = ctx.num_params // D
        if any(needs[6:]):
            grad_w_ih = gp2.t() @ x.reshape(T * B, I)
            grad_b = grad_pre.sum((0, 1)) if per_dir == 4 else None
            for d in range(D):
                cols = slice(d * H, (d + 1) * H)
                gp_d, out_d = grad_pre[..., cols], out[..., cols]
                if d == 0:  # h_{t-1} of step t is out[t-1], h0 at t = 0
                    later, earlier, first = gp_d[1:], out_d[:-1], gp_d[0]
                else:  # the reverse direction's previous state is out[t+1] (0 past a row's end),
                    # h0 at the row's last valid step
                    later, earlier = gp_d[:-1], out_d[1:]
                    first = gp_d[T - 1] if lengths is None else gp_d[lengths - 1, torch.arange(B, device=x.device)]
                grad_w_hh = first.t() @ h0[d]
                if T > 1:
                    grad_w_hh = grad_w_hh.addmm_(later.reshape(-1, H).t(), earlier.reshape(-1, H))
                grad_params += [grad_w_ih[cols], grad_w_hh]
                if per_dir == 4:
                    grad_params += [grad_b[cols], grad_b[cols].clone()]
        else:
            grad_params = [None] * ctx.num_params
        return (grad_x, grad_h0 if needs[1] else None, None, None, None, None, *grad_params)
