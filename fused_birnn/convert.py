"""Swap `torch.nn.RNN` modules inside a model for `fused_birnn.RNN` (`convert`) and back (`to_torch`).

Both work like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new module takes over the old one's
`Parameter` objects (no copy), so an optimizer built before the swap, tied weights, `requires_grad`
flags and tensor hooks all carry over; only where the parameters' values live changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import nn
from torch.nn.utils import parametrize

from .functional import BACKENDS
from .rnn import RNN

Skipped = list[tuple[str, str]]

# module hook registries that a swap would drop (hooks on the parameters themselves carry over)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _why_not(m: nn.Module, source: type[nn.Module]) -> str | None:
    """Why `m`, found where a `source` module would be swapped, cannot be; None if it can."""
    if not isinstance(m, source):
        return f"{type(m).__name__} has no fused version yet"
    if parametrize.is_parametrized(m):
        return "has parametrizations (torch.nn.utils.parametrize); remove them first"
    if type(m) is not source:
        source_name = "torch.nn.RNN" if source is nn.RNN else "fused_birnn.RNN"
        return (f"{type(m).__qualname__} subclasses {source_name} (its forward may differ); "
                "only the exact type is swapped")
    if getattr(m, "proj_size", 0):
        return f"proj_size={m.proj_size} is not supported"
    names = list(m._flat_weights_names)
    params = dict(m.named_parameters(recurse=False, remove_duplicate=False))
    if sorted(params) != sorted(names) or any(getattr(m, n) is not params[n] for n in names):
        return (f"its parameters {sorted(params)} are not the {len(names)} that nn.RNN defines "
                f"(e.g. old-style weight_norm or a replaced tensor)")
    if any(getattr(m, d, None) for d in _HOOK_DICTS):
        return "has module hooks registered on it, which would not carry over"
    flat = [params[n] for n in names]
    kinds = {f"{str(p.dtype).removeprefix('torch.')} on {p.device}" for p in flat}
    if len(kinds) > 1:
        return f"its parameters mix dtypes or devices ({', '.join(sorted(kinds))})"
    return None


def _swap(m: nn.Module, new: nn.Module) -> nn.Module:
    """Hand `m`'s parameters (the same objects) and train/eval mode to `new`, built on 'meta'."""
    for name in m._flat_weights_names:
        setattr(new, name, getattr(m, name))  # RNNBase.__setattr__ keeps _flat_weights current
    new._init_flat_weights()  # as after .to(): refresh the weight list, then flatten_parameters()
    new.train(m.training)
    return new


def _convert_modules(model: nn.Module, source: type[nn.Module], candidate: Callable[[nn.Module], bool],
                     build: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, Skipped]:
    """Replace every module for which `candidate(m)` holds in `model` (root included) by `build(m)`
    where `_why_not(m, source)` allows, through every parent that holds it; a module held twice is
    swapped once and stays shared."""
    done: dict[int, nn.Module] = {}  # id(old) -> its replacement, or itself if skipped
    visited: set[int] = set()
    skipped: Skipped = []

    def visit(m: nn.Module, name: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        if candidate(m):
            reason = _why_not(m, source)
            if reason is None:
                done[id(m)] = build(m)
                return done[id(m)]
            skipped.append((name, reason))
            done[id(m)] = m
        if id(m) not in visited:
            visited.add(id(m))
            for child_name, child in list(m._modules.items()):  # not named_children(): it hides repeats
                if child is not None:
                    new = visit(child, f"{name}.{child_name}" if name else child_name)
                    if new is not child:
                        setattr(m, child_name, new)
        return m

    return visit(model, ""), skipped


def _is_recurrent(m: nn.Module) -> bool:
    """nn.RNN, nn.LSTM, nn.GRU and their subclasses: what `convert` swaps or reports."""
    return isinstance(m, nn.RNNBase) and not isinstance(m, RNN)


def _finish(what: str, model: nn.Module, skipped: Skipped, report: bool):
    if report:
        return model, skipped
    if skipped:
        listed = "; ".join(f"{name or '<root>'!r}: {reason}" for name, reason in skipped)
        warnings.warn(f"{what} left {len(skipped)} module(s) unchanged: {listed}", stacklevel=3)
    return model


def _to_fused(m: nn.RNN, backend: str) -> RNN:
    new = RNN(m.input_size, m.hidden_size, m.num_layers, m.nonlinearity, m.bias, m.batch_first,
              m.dropout, m.bidirectional, device="meta", backend=backend)
    return _swap(m, new)


def _to_nn(m: RNN) -> nn.RNN:
    new = nn.RNN(m.input_size, m.hidden_size, m.num_layers, m.nonlinearity, m.bias, m.batch_first,
                 m.dropout, m.bidirectional, device="meta")
    with torch.no_grad():
        for name in m._flat_weights_names:  # out of the shared flat buffers: one storage each
            p = getattr(m, name)
            p.set_(p.detach().clone(memory_format=torch.contiguous_format))
    return _swap(m, new)


@overload
def convert(model: nn.Module, *, backend: str = ..., report: Literal[False] = ...) -> nn.Module: ...


@overload
def convert(model: nn.Module, *, backend: str = ..., report: Literal[True]) -> tuple[nn.Module, Skipped]: ...


def convert(model: nn.Module, *, backend: str = "auto", report: bool = False):
    r"""Replace every :class:`torch.nn.RNN` in ``model`` by a :class:`fused_birnn.RNN`, in place.

    Each ``nn.RNN`` (the exact type: subclasses may override ``forward``) found by walking ``model``
    recursively, ``model`` itself included, is swapped, in every parent that holds it (``Sequential``,
    ``ModuleList``, ``ModuleDict``, custom modules), for a ``fused_birnn.RNN`` with the same
    hyperparameters (``input_size``, ``hidden_size``, ``num_layers``, ``nonlinearity``, ``bias``,
    ``batch_first``, ``dropout``, ``bidirectional``) and train/eval mode. A module held in several
    places is replaced by one new module, so it stays shared.

    The new module takes over the **same** :class:`~torch.nn.Parameter` objects (as
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does): values, dtype, device,
    ``requires_grad``, tensor hooks, an optimizer created before the call, and weights tied to other
    modules all carry over. Their storage is repacked into ``fused_birnn.RNN``'s flat per-layer buffers
    (:meth:`fused_birnn.RNN.flatten_parameters`); a parameter tied to another ``nn.RNN`` ends up in one
    module's buffer and the other packs it per call, which is correct but slower. Nothing is copied, so
    to keep the original model, convert a :func:`copy.deepcopy` of it.

    Modules that cannot be swapped are left as they are and reported: ``nn.LSTM`` and ``nn.GRU`` (no
    fused version yet), subclasses of ``nn.RNN`` (parametrized ones included), and ``nn.RNN`` modules
    with ``proj_size``, parameters of mixed dtypes or devices, parameters other than ``nn.RNN``'s own
    (e.g. old-style ``weight_norm``), or module hooks.

    Args:
        model: the module to convert; modified in place.
        backend: the ``backend=`` of every new ``fused_birnn.RNN`` (``'auto'``, ``'triton'`` or
            ``'torch'``).
        report: if ``False`` (default), emit one :class:`UserWarning` naming every module left
            unchanged and why, and return the model; if ``True``, emit no warning and return
            ``(model, skipped)`` instead.

    Returns:
        ``model``, or the new module if ``model`` itself was an ``nn.RNN``; with ``report=True``,
        ``(model, skipped)`` where ``skipped`` lists ``(qualified_name, reason)`` per module left
        unchanged, names as in :meth:`~torch.nn.Module.named_modules` (``''`` for the root).

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.RNN(8, 16, 2, bidirectional=True))
        >>> model = fused_birnn.convert(model)
        >>> type(model[1])
        <class 'fused_birnn.rnn.RNN'>
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    model, skipped = _convert_modules(model, nn.RNN, _is_recurrent, lambda m: _to_fused(m, backend))
    return _finish("fused_birnn.convert", model, skipped, report)


@overload
def to_torch(model: nn.Module, *, report: Literal[False] = ...) -> nn.Module: ...


@overload
def to_torch(model: nn.Module, *, report: Literal[True]) -> tuple[nn.Module, Skipped]: ...


def to_torch(model: nn.Module, *, report: bool = False):
    r"""Replace every :class:`fused_birnn.RNN` in ``model`` by a :class:`torch.nn.RNN`, in place: the
    inverse of :func:`convert`, e.g. before ``torch.export``, ONNX export or TorchScript.

    Same walk, same rules and same return values as :func:`convert`: the exact type
    ``fused_birnn.RNN`` is swapped (subclasses are reported), train/eval mode is kept and the new
    ``nn.RNN`` takes over the same :class:`~torch.nn.Parameter` objects, each moved out of the
    shared flat buffer into a contiguous storage of its own, as ``nn.RNN`` builds them.

    Args:
        model: the module to convert; modified in place.
        report: as in :func:`convert`.

    Returns:
        ``model`` (or the new ``nn.RNN`` if ``model`` was a ``fused_birnn.RNN``); with ``report=True``,
        ``(model, skipped)``.
    """
    model, skipped = _convert_modules(model, RNN, lambda m: isinstance(m, RNN), _to_nn)
    return _finish("fused_birnn.to_torch", model, skipped, report)
