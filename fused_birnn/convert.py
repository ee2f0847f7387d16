"""Swap `torch.nn.RNN` / `nn.LSTM` / `nn.GRU` modules inside a model for `fused_birnn.RNN` / `LSTM` / `GRU`
(`convert`) and back (`to_torch`).

Both work like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new module takes over the old one's
`Parameter` objects (no copy), so an optimizer built before the swap, tied weights, `requires_grad`
flags and tensor hooks all carry over; only where the parameters' values live changes. The standard
transformations of a module's weights carry over too, as the same objects: parametrizations
(`torch.nn.utils.parametrize`, e.g. `parametrizations.weight_norm` / `spectral_norm`), pruning
(`torch.nn.utils.prune`) and the old-style `weight_norm` / `spectral_norm` (their forward pre-hooks,
state-dict hooks, parameters and buffers). Any other module hook is the user's code, which may hold the old
module: such a module is left alone and reported.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import nn
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm

from .functional import BACKENDS
from .rnn import GRU, LSTM, RNN

Skipped = list[tuple[str, str]]

# torch.nn class -> our drop-in (`convert`), and back (`to_torch`)
_FUSED: dict[type[nn.RNNBase], type[nn.RNNBase]] = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU}
_TORCH: dict[type[nn.RNNBase], type[nn.RNNBase]] = {v: k for k, v in _FUSED.items()}
_SWAPPED = {**_FUSED, **_TORCH}

# module hook registries (hooks on the parameters themselves carry over with them)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# the hooks of torch's weight transformations, which read and write only the module they are called with:
# these carry over to the new module (pruning, old-style weight norm and spectral norm)
_TRANSFORM_HOOKS = {"_forward_pre_hooks": (prune.BasePruningMethod, WeightNorm, SpectralNorm),
                    "_state_dict_hooks": (SpectralNormStateDictHook,),
                    "_load_state_dict_pre_hooks": (SpectralNormLoadStateDictPreHook,)}


def _transform_hook(registry: str, hook) -> bool:
    """Whether `hook`, registered in `registry`, is one of torch's weight transformations' (`_TRANSFORM_HOOKS`,
    and `parametrizations.weight_norm`'s closure that renames old `weight_g` / `weight_v` state-dict keys)."""
    if isinstance(hook, _WrappedHook):  # load_state_dict pre-hooks come wrapped
        if hook.with_module:
            return False
        hook = hook.hook
        if (registry == "_load_state_dict_pre_hooks" and getattr(hook, "__module__", None) == parametrizations.__name__
                and getattr(hook, "__qualname__", None) == "weight_norm.<locals>._weight_norm_compat_hook"):
            return True
    return isinstance(hook, _TRANSFORM_HOOKS.get(registry, ()))


def _hooked_names(m: nn.Module) -> set[str]:
    """The weights that a transformation's forward pre-hook sets on `m` before each call."""
    return {getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)  # pruning / weight & spectral norm
            for hook in m._forward_pre_hooks.values()}


def _qualified(cls: type) -> str:
    return f"{'torch.nn' if cls.__module__.startswith('torch.') else 'fused_birnn'}.{cls.__name__}"


def _source(m: nn.Module, sources: tuple[type[nn.Module], ...]) -> type[nn.Module] | None:
    """The class of `sources` that `m` is an instance of (subclasses included), or None."""
    return next((cls for cls in sources if isinstance(m, cls)), None)


def _why_not(m: nn.Module, sources: tuple[type[nn.Module], ...]) -> str | None:
    """Why `m`, found where one of `sources` would be swapped, cannot be; None if it can."""
    source = _source(m, sources)
    if source is None:
        return f"{type(m).__name__} has no fused version (only {', '.join(c.__name__ for c in sources)})"
    cls = _unparametrized(m)
    if cls is not source:
        return (f"{cls.__qualname__} subclasses {_qualified(source)} (its forward may differ); "
                "only the exact type is swapped")
    if getattr(m, "proj_size", 0) and m.mode != "LSTM":  # nn.RNN/nn.GRU refuse it: a doctored module
        return f"proj_size={m.proj_size} is only supported for LSTM"
    others = sorted({f"{type(getattr(hook, 'hook', hook)).__name__} in {registry}" for registry in _HOOK_DICTS
                     for hook in getattr(m, registry, {}).values() if not _transform_hook(registry, hook)})
    if others:
        return (f"has module hooks registered on it ({', '.join(others)}), which would not carry over (they may "
                f"hold the old module): convert first, then register them on the {_qualified(_SWAPPED[source])}")
    params = m._parameters
    hooked = _hooked_names(m)
    for name in m._flat_weights_names:
        if name in params:
            if params[name] is None or getattr(m, name) is not params[name]:
                return f"its {name} is not the Parameter that {_qualified(source)} defines"
        elif not (parametrize.is_parametrized(m, name) or name in hooked):
            return (f"its {name} is neither a Parameter, a parametrization nor set by a pruning, weight_norm or "
                    f"spectral_norm hook (e.g. deleted, or set by a hook of your own)")
    kinds = {f"{str(p.dtype).removeprefix('torch.')} on {p.device}" for p in m.parameters()}
    if len(kinds) > 1:
        return f"its parameters mix dtypes or devices ({', '.join(sorted(kinds))})"
    return None


def _swap(m: nn.Module, new: nn.Module) -> nn.Module:
    """Hand `m`'s parameters (the same objects), train/eval mode and weight transformations (`_why_not`
    allows only torch's: parametrizations, and pruning / weight norm / spectral norm with their hooks,
    parameters and buffers) to `new`, built on 'meta'. Nothing is evaluated: a parametrization (spectral
    norm's power iteration) runs next when the module is called, as often as it would have in `m`."""
    names = m._flat_weights_names
    for name in names:
        if name in m._parameters:
            setattr(new, name, m._parameters[name])  # RNNBase.__setattr__ keeps _flat_weights current
        else:  # parametrized or set by a hook: no Parameter of that name
            delattr(new, name)
            if name in m.__dict__:  # the tensor the hook set last
                setattr(new, name, m.__dict__[name])
    for name, p in m._parameters.items():  # a transformation's own: weight_orig, weight_g / weight_v
        if name not in names:
            new.register_parameter(name, p)
    for name, b in m._buffers.items():  # weight_mask, spectral norm's weight_u / weight_v
        new.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
    if parametrize.is_parametrized(m):  # the same ParametrizationLists (their originals) on new's own class
        parametrize._inject_new_class(new)
        new.parametrizations = m.parametrizations
        for name in m.parametrizations:
            parametrize._inject_property(new, name)
    for registry in _TRANSFORM_HOOKS:
        getattr(new, registry).update(getattr(m, registry))
    # m's weight list as it stands (nothing evaluated), then our flat buffers
    new._flat_weights = [m._parameters[n] if n in m._parameters else w for n, w in zip(names, m._flat_weights)]
    refs = getattr(m, "_flat_weight_refs", None) or [None] * len(names)
    new._flat_weight_refs = [weakref.ref(w) if n in m._parameters else ref
                             for n, w, ref in zip(names, new._flat_weights, refs)]
    new.flatten_parameters()
    new.train(m.training)
    return new


def _convert_modules(model: nn.Module, sources: tuple[type[nn.Module], ...],
                     candidate: Callable[[nn.Module], bool],
                     build: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, Skipped]:
    """Replace every module for which `candidate(m)` holds in `model` (root included) by `build(m)`
    where `_why_not(m, sources)` allows, through every parent that holds it; a module held twice is
    swapped once and stays shared."""
    done: dict[int, nn.Module] = {}  # id(old) -> its replacement, or itself if skipped
    visited: set[int] = set()
    skipped: Skipped = []

    def visit(m: nn.Module, name: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        if candidate(m):
            reason = _why_not(m, sources)
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
    """Every nn.RNNBase but ours (nn.RNN, nn.LSTM, nn.GRU, their subclasses): what `convert` swaps or
    reports."""
    return isinstance(m, nn.RNNBase) and not isinstance(m, tuple(_TORCH))


def _finish(what: str, model: nn.Module, skipped: Skipped, report: bool):
    if report:
        return model, skipped
    if skipped:
        listed = "; ".join(f"{name or '<root>'!r}: {reason}" for name, reason in skipped)
        warnings.warn(f"{what} left {len(skipped)} module(s) unchanged: {listed}", stacklevel=3)
    return model


def _hyperparameters(m: nn.RNNBase) -> dict:
    """The constructor arguments that rebuild `m` (an RNN, LSTM or GRU, ours or torch's)."""
    kwargs = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                  batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional)
    if m.mode == "LSTM":
        kwargs["proj_size"] = m.proj_size
    elif m.mode in ("RNN_TANH", "RNN_RELU"):
        kwargs["nonlinearity"] = m.nonlinearity
    return kwargs


def _unparametrized(m: nn.Module) -> type[nn.Module]:
    """`m`'s class, under the subclass that parametrize puts a parametrized module in."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _to_fused(m: nn.RNNBase, backend: str) -> nn.RNNBase:
    new = _FUSED[_unparametrized(m)](**_hyperparameters(m), device="meta", backend=backend)
    return _swap(m, new)


def _to_nn(m: nn.RNNBase) -> nn.RNNBase:
    new = _TORCH[_unparametrized(m)](**_hyperparameters(m), device="meta")
    with torch.no_grad():
        for p in m.parameters():  # out of the shared flat buffers (weight_orig too): one storage each
            p.set_(p.detach().clone(memory_format=torch.contiguous_format))
    return _swap(m, new)


@overload
def convert(model: nn.Module, *, backend: str = ..., report: Literal[False] = ...) -> nn.Module: ...


@overload
def convert(model: nn.Module, *, backend: str = ..., report: Literal[True]) -> tuple[nn.Module, Skipped]: ...


def convert(model: nn.Module, *, backend: str = "auto", report: bool = False):
    r"""Replace every :class:`torch.nn.RNN`, :class:`torch.nn.LSTM` and :class:`torch.nn.GRU` in ``model``
    by a :class:`fused_birnn.RNN`, :class:`fused_birnn.LSTM` or :class:`fused_birnn.GRU`, in place.

    Each ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (the exact type: subclasses may override ``forward``)
    found by walking ``model`` recursively, ``model`` itself included, is swapped, in every parent that
    holds it (``Sequential``, ``ModuleList``, ``ModuleDict``, custom modules), for our module of the same
    cell with the same hyperparameters (``input_size``, ``hidden_size``, ``num_layers``, ``bias``,
    ``batch_first``, ``dropout``, ``bidirectional``; ``nonlinearity`` for RNN, ``proj_size`` for LSTM)
    and train/eval mode. A module held in several places is replaced by one new module, so it stays
    shared.

    The new module takes over the **same** :class:`~torch.nn.Parameter` objects (as
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does): values, dtype, device,
    ``requires_grad``, tensor hooks, an optimizer created before the call, and weights tied to other
    modules all carry over. Their storage is repacked into our modules' flat per-layer buffers
    (:meth:`fused_birnn.RNN.flatten_parameters`); a parameter tied to another recurrent module ends up in
    one module's buffer and the other packs it per call, which is correct but slower. Nothing is copied,
    so to keep the original model, convert a :func:`copy.deepcopy` of it.

    Transformed weights carry over as they are, the same objects, and keep running as they did in the
    ``torch.nn`` module: parametrizations (:mod:`torch.nn.utils.parametrize`, e.g.
    ``parametrizations.weight_norm`` / ``spectral_norm``: the new module is parametrized alike, with the
    same ``original`` parameters), pruning (:mod:`torch.nn.utils.prune`) and the old-style
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (their hooks, ``weight_orig``, ``weight_mask``,
    ``weight_g``, ``weight_v``, ``weight_u``).

    Modules that cannot be swapped are left as they are and reported: other ``nn.RNNBase`` modules,
    subclasses of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, and modules with parameters of mixed dtypes or
    devices, a weight that is neither a parameter nor one of those transformations' (deleted, or set by
    a hook of your own, as weight drop does), or module hooks other than those transformations' (yours
    may hold the old module: convert first, then register them, or apply your weight drop, on the new
    module).

    Args:
        model: the module to convert; modified in place.
        backend: the ``backend=`` of every new module (``'auto'``, ``'triton'`` or ``'torch'``).
        report: if ``False`` (default), emit one :class:`UserWarning` naming every module left
            unchanged and why, and return the model; if ``True``, emit no warning and return
            ``(model, skipped)`` instead.

    Returns:
        ``model``, or the new module if ``model`` itself was swapped; with ``report=True``,
        ``(model, skipped)`` where ``skipped`` lists ``(qualified_name, reason)`` per module left
        unchanged, names as in :meth:`~torch.nn.Module.named_modules` (``''`` for the root).

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 16, 2, bidirectional=True))
        >>> model = fused_birnn.convert(model)
        >>> type(model[1])
        <class 'fused_birnn.rnn.LSTM'>
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    model, skipped = _convert_modules(model, tuple(_FUSED), _is_recurrent, lambda m: _to_fused(m, backend))
    return _finish("fused_birnn.convert", model, skipped, report)


@overload
def to_torch(model: nn.Module, *, report: Literal[False] = ...) -> nn.Module: ...


@overload
def to_torch(model: nn.Module, *, report: Literal[True]) -> tuple[nn.Module, Skipped]: ...


def to_torch(model: nn.Module, *, report: bool = False):
    r"""Replace every :class:`fused_birnn.RNN`, :class:`fused_birnn.LSTM` and :class:`fused_birnn.GRU` in
    ``model`` by a :class:`torch.nn.RNN`, :class:`torch.nn.LSTM` or :class:`torch.nn.GRU`, in place: the
    inverse of :func:`convert`, e.g. before ``torch.jit.script``.

    Same walk, same rules and same return values as :func:`convert`: the exact types are swapped
    (subclasses are reported), train/eval mode is kept and the new module takes over the same
    :class:`~torch.nn.Parameter` objects, each moved out of the shared flat buffer into a contiguous
    storage of its own, as ``torch.nn`` builds them; transformed weights carry over as in :func:`convert`.

    Args:
        model: the module to convert; modified in place.
        report: as in :func:`convert`.

    Returns:
        ``model`` (or the new module if ``model`` itself was swapped); with ``report=True``,
        ``(model, skipped)``.
    """
    model, skipped = _convert_modules(model, tuple(_TORCH), lambda m: isinstance(m, tuple(_TORCH)), _to_nn)
    return _finish("fused_birnn.to_torch", model, skipped, report)
