"""PyTorch's own module tests, run against our modules.

PyTorch tests every `torch.nn` module with the generic checks of `TestModule` (and `TestModuleCPUOnly`)
in its repository's test/test_modules.py, fed by the `ModuleInfo` entries that torch ships in
`torch.testing._internal.common_modules.module_db`: constructor and forward inputs, a reference function,
error inputs and flags (`train_and_eval_differ`, `supports_gradgrad`, `gradcheck_fast_mode`, `dtypes`).
That file is not installed with torch, so this is our own harness for the same checks: it takes the
ModuleInfo of each torch class in `OURS` and builds our class from the samples instead, with `backend=`
each CPU backend (the kernels through Triton's interpreter). Comparisons use `torch.testing.assert_close`
with TestModule's tolerances (its `assertEqual` raises both to at least 1e-5). Adding LSTM or GRU is one
entry in `OURS`.

TestModule's tests, here: test_forward, test_factory_kwargs, test_repr, test_save_load,
test_non_contiguous_tensors, test_grad and test_gradgrad (each split in two: all parameters at once, and
`_partial`, one at a time), test_memory_format, test_if_train_and_eval_modes_differ, test_errors,
test_to, test_to_empty; TestModuleCPUOnly's test_device_ctx_init; on a GPU (`-m cuda`)
test_multiple_device_transfer and test_cpu_gpu_parity. test_check_inplace applies only to modules whose
constructor takes `inplace` (test_check_inplace below says so for each class).

Beyond TestModule: every forward is also compared, at our per-dtype tolerances, with the torch class
holding our `state_dict` (module_db's reference_fn for nn.RNN compares an unbatched input with a batch of
one through the same module: a self-consistency check); test_to / test_to_empty also check the results
after the conversion; test_pickle_and_deepcopy; and the "packed" input set: the samples the same inputs
function builds with `with_packed_sequence=True` (module_db binds only `is_rnn`, so TestModule never runs
them). Their reference_fn cannot serve (it unsqueezes the input, which a PackedSequence cannot do, for
nn.RNN as well): the torch class with our weights is their reference.
"""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import tempfile
import unittest
import zlib
from itertools import product
from operator import methodcaller

import pytest
import torch
from conftest import CPU_BACKENDS, TOLERANCES
from torch._subclasses.meta_utils import assert_metadata_eq
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

# torch's harness imports expecttest (the [test] extra installs it; a GPU image may lack it): without it this
# module is skipped, not a collection error that stops `pytest -m cuda tests` before any test runs
try:
    import expecttest  # noqa: F401
except ImportError:
    pytest.skip("torch.testing._internal needs expecttest (pip install expecttest)", allow_module_level=True)
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck  # noqa: E402

import fused_birnn

# torch class -> ours
OURS = {torch.nn.RNN: fused_birnn.RNN, torch.nn.LSTM: fused_birnn.LSTM, torch.nn.GRU: fused_birnn.GRU}
INFOS = [info for info in module_db if info.module_cls in OURS]
assert len(INFOS) == len(OURS), "every class in OURS has a ModuleInfo in torch's module_db"

DEVICE = "cpu"
# TestModule's class attributes `precision = rel_tol = 1e-5` raise assertEqual's tolerances to >= 1e-5
TM_TOL = dict(atol=1e-5, rtol=1e-5)
DTYPE_METHOD = {torch.float32: methodcaller("float"), torch.float64: methodcaller("double")}
INPUT_SETS = ["module_db", "packed"]

# How many of a case's samples (for the `_partial` tests: (sample, parameter) pairs) each test runs, on
# (the PyTorch path, the kernels); None: all. TestModule runs all of them, which through Triton's
# interpreter (about 40 ms a launch, seconds a gradcheck) would take hours. `pick` spaces them evenly,
# starting at a place that depends on the test and the case, so the cases of a test spread over the
# configurations (nonlinearity, bias, batch_first, bidirectional, hx or not, the two packed batches); on
# the PyTorch path a quarter of the samples in each of the four (dtype, mode) cases covers all of them.
# FUSED_BIRNN_MODULE_DB=full runs every sample and case, as TestModule does (hours: an estimate).
FULL = os.environ.get("FUSED_BIRNN_MODULE_DB", "") == "full"
BUDGET = {
    "test_forward": (8, 2),
    "test_factory_kwargs": (8, 1),
    "test_repr": (None, None),
    "test_save_load": (8, 1),
    "test_pickle_and_deepcopy": (4, 1),
    "test_non_contiguous_tensors": (4, 1),
    "test_grad": (4, 1),
    "test_grad_partial": (8, 1),
    "test_gradgrad": (2, 1),
    "test_gradgrad_partial": (2, 1),
    "test_memory_format": (8, 1),
    "test_if_train_and_eval_modes_differ": (8, 1),
    "test_to": (8, 1),
    "test_to_empty": (8, 1),
    "test_device_ctx_init": (None, None),
}


def pick(items, test_name, backend, dtype, training):
    """`BUDGET[test_name]` of `items`, evenly spaced, the start depending on the test and the case."""
    n = BUDGET[test_name][0 if backend == "torch" else 1]
    if FULL or n is None or n >= len(items):
        return list(items)
    stride = len(items) // n
    case = 2 * (dtype == torch.float64) + (not training)
    start = (zlib.crc32(test_name.encode()) + 5 * case) % stride
    return [items[start + k * stride] for k in range(n)]


def _marks_from_module_info(info, test_name, dtype):
    """What TestModule's `@modules` would apply here from the ModuleInfo's decorators/skips (all of
    nn.RNN's concern cuDNN, i.e. CUDA only): an expected failure becomes a strict xfail, anything else
    a skip naming the decorator."""
    marks = []
    for decorator in info.get_decorators("TestModule", test_name, DEVICE, dtype, {}):
        if decorator is unittest.expectedFailure:
            marks.append(pytest.mark.xfail(strict=True, reason=f"ModuleInfo expects {test_name} to fail"))
        else:
            marks.append(pytest.mark.skip(reason=f"ModuleInfo decorator {decorator!r}"))
    return marks


def cases(test_name, *, dtypes=None, training=(True, False), input_sets=INPUT_SETS, backends=None,
          kernel_cases=None):
    """(info, backend, dtype, training, input set) cases as TestModule's `@modules` makes them: the
    ModuleInfo's dtypes (intersected with `dtypes`), train and eval if the ModuleInfo says they differ.
    `kernel_cases`: the (training, input set) pairs the kernels run, where not all (a budget)."""
    out = []
    for info in INFOS:
        flags = training if info.train_and_eval_differ else training[:1]
        for dtype, train, inputs, backend in product(info.dtypes, flags, input_sets, backends or CPU_BACKENDS):
            if dtypes is not None and dtype not in dtypes:
                continue
            backend_id = backend if isinstance(backend, str) else backend.values[0]
            if backend_id == "triton" and kernel_cases and not FULL and (train, inputs) not in kernel_cases:
                continue
            backend_marks = () if isinstance(backend, str) else backend.marks
            out.append(pytest.param(
                info, backend_id, dtype, train, inputs,
                marks=[*backend_marks, *_marks_from_module_info(info, test_name, dtype)],
                id=f"{info.formatted_name}-{backend_id}-{str(dtype)[6:]}-{'train' if train else 'eval'}-{inputs}"))
    return out


CASE_ARGS = "info, backend, dtype, training, inputs"


def samples(info, dtype, *, requires_grad, training, inputs, device=DEVICE):
    """All the ModuleInfo's samples, or (inputs='packed') those its inputs function adds with
    `with_packed_sequence=True`."""
    func = info.module_inputs_func
    kwargs = dict(device=device, dtype=dtype, requires_grad=requires_grad, training=training)
    if inputs == "module_db":
        return func(info, **kwargs)
    if "with_packed_sequence" not in inspect.signature(func).parameters:
        pytest.skip(f"{info.name}'s inputs function has no with_packed_sequence samples")
    found = [s for s in func(info, with_packed_sequence=True, **kwargs) if _has_packed(s.forward_input)]
    assert found, "with_packed_sequence=True built no PackedSequence sample"
    return found


def case_samples(test_name, info, backend, dtype, training, inputs, *, requires_grad):
    """The samples `test_name` runs for this case (`BUDGET`), skipping those without a forward input."""
    found = samples(info, dtype, requires_grad=requires_grad, training=training, inputs=inputs)
    return [s for s in pick(found, test_name, backend, dtype, training) if s.forward_input is not None]


def _has_packed(forward_input) -> bool:
    return forward_input is not None and any(
        isinstance(a, PackedSequence) for a in (*forward_input.args, *forward_input.kwargs.values()))


def build(info, sample, backend, **extra):
    """Our module from the sample's constructor input (plus `extra` keywords)."""
    c = sample.constructor_input
    return OURS[info.module_cls](*c.args, **c.kwargs, **extra, backend=backend)


def twin(info, sample, m):
    """The torch class, same constructor input, holding `m`'s state_dict, same dtype and mode."""
    c = sample.constructor_input
    p = next(m.parameters())
    ref = info.module_cls(*c.args, **c.kwargs, device=p.device, dtype=p.dtype)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    # torch's RNNBase keeps weak references to its parameters, which swap_tensors refuses: nn.RNN's own
    # load_state_dict fails under the swap flag, so load without it
    torch.__future__.set_swap_module_params_on_conversion(False)
    try:
        ref.load_state_dict(m.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    return ref.train(m.training)


def tensors_map(fn, obj):
    """`fn` over every tensor of a nest of tuples/lists/dicts; of a PackedSequence, over its data and
    indices (its batch_sizes stay as they are: always a contiguous CPU tensor made by packing)."""
    if isinstance(obj, PackedSequence):
        data, batch_sizes, *indices = obj
        return PackedSequence(fn(data), batch_sizes, *(None if i is None else fn(i) for i in indices))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tensors_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: tensors_map(fn, o) for k, o in obj.items()}
    return fn(obj) if isinstance(obj, torch.Tensor) else obj


def close_to_twin(actual, expected, dtype, msg):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def assert_params_and_buffers_are(m, device, dtype):
    """Every parameter and buffer on `device`; the floating ones in `dtype`."""
    device = torch.device(device)
    for kind, items in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
        for name, t in items:
            assert t.device == device, f"{kind} {name} is on {t.device}, expected {device}"
            if t.dtype.is_floating_point:
                assert t.dtype == dtype, f"{kind} {name} is {t.dtype}, expected {dtype}"


@pytest.fixture
def restore_swap_flag():
    """What TestModule's `wrapSwapTensorsTest` does: leave the global swap flag as found."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


# ---------------------------------------------------------------------------------------- TestModule


@pytest.mark.parametrize(CASE_ARGS, cases("test_forward"))
def test_forward(info, backend, dtype, training, inputs):
    """Forward equals the sample's reference_fn (unbatched input against a batch of one) and the torch
    class with our weights; after `.float()`/`.double()` it still runs, every parameter in that dtype."""
    for s in case_samples("test_forward", info, backend, dtype, training, inputs, requires_grad=False):
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        with freeze_rng_state():
            m = build(info, s, backend).to(DEVICE).to(dtype)
            m.train(training)
            out = m(*args, **kwargs)
            if s.reference_fn is not None and inputs == "module_db":
                torch.testing.assert_close(out, s.reference_fn(m, *args, **kwargs), **TM_TOL)
            close_to_twin(out, twin(info, s, m)(*args, **kwargs), dtype, f"{s.constructor_input.kwargs}")
            DTYPE_METHOD[dtype](m)
            m(*args, **kwargs)
            assert_params_and_buffers_are(m, DEVICE, dtype)


@pytest.mark.parametrize(CASE_ARGS, cases("test_factory_kwargs", input_sets=["module_db"]))
def test_factory_kwargs(info, backend, dtype, training, inputs):
    """`device=`/`dtype=` at construction reach every parameter and buffer (TestModule checks only
    modules that create some: ours do), and the module runs in that dtype."""
    for s in case_samples("test_factory_kwargs", info, backend, dtype, training, inputs, requires_grad=False):
        assert list(build(info, s, backend).parameters())
        m = build(info, s, backend, device=DEVICE, dtype=dtype)
        m.train(training)
        assert_params_and_buffers_are(m, DEVICE, dtype)
        assert pytree.tree_leaves(m(*s.forward_input.args, **s.forward_input.kwargs))[0].dtype == dtype


@pytest.mark.parametrize(CASE_ARGS, cases("test_repr", input_sets=["module_db"]))
def test_repr(info, backend, dtype, training, inputs):
    """repr() and str() work (TestModule's check) and name the class and its sizes."""
    for s in case_samples("test_repr", info, backend, dtype, training, inputs, requires_grad=False):
        m = build(info, s, backend).to(DEVICE).to(dtype)
        m.train(training)
        r = m.__repr__()
        assert str(m) == r
        c = s.constructor_input.kwargs
        assert r.startswith(f"{OURS[info.module_cls].__name__}({c['input_size']}, {c['hidden_size']}"), r


@pytest.mark.parametrize(CASE_ARGS, cases("test_save_load"))
def test_save_load(info, backend, dtype, training, inputs):
    """torch.save of the whole module loads (weights_only=False) into one giving the same output; the
    saved state_dict loads back equal, also with weights_only=True."""
    for s in case_samples("test_save_load", info, backend, dtype, training, inputs, requires_grad=False):
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        with freeze_rng_state():
            m = build(info, s, backend).to(DEVICE).to(dtype)
            m.train(training)
            sd = m.state_dict()
            out = m(*args, **kwargs)
            with tempfile.TemporaryFile() as f:
                torch.save(m, f)
                f.seek(0)
                m_copy = torch.load(f, weights_only=False)
                assert type(m_copy) is type(m) and m_copy.backend == backend
                torch.testing.assert_close(m_copy(*args, **kwargs), out, **TM_TOL)
            with tempfile.TemporaryFile() as f:
                torch.save(sd, f)
                f.seek(0)
                torch.testing.assert_close(torch.load(f), sd, **TM_TOL)
                f.seek(0)
                torch.testing.assert_close(torch.load(f, weights_only=True), sd, **TM_TOL)


@pytest.mark.parametrize(CASE_ARGS, cases("test_pickle_and_deepcopy", input_sets=["module_db"]))
def test_pickle_and_deepcopy(info, backend, dtype, training, inputs):
    """(Ours, beyond TestModule.) pickle and copy.deepcopy give an independent module with the same
    output: changing the copy's weights leaves the original alone, and the copy computes with its own."""
    for s in case_samples("test_pickle_and_deepcopy", info, backend, dtype, training, inputs, requires_grad=False):
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        m = build(info, s, backend).to(dtype)
        m.train(training)
        out = m(*args, **kwargs)
        before = copy.deepcopy(m.state_dict())
        for c in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert c.training == training
            torch.testing.assert_close(c(*args, **kwargs), out, **TM_TOL)
            with torch.no_grad():
                for p in c.parameters():
                    p.mul_(0.5)
            torch.testing.assert_close(m.state_dict(), before, atol=0, rtol=0)
            close_to_twin(c(*args, **kwargs), twin(info, s, c)(*args, **kwargs), dtype, "copy after an update")


def _make_non_contiguous(obj):
    """TestModule's trick on every tensor of dim > 0: the same values, every other element of a doubled
    last dimension."""
    def nc(t):
        if t.dim() == 0:
            return t
        out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
        out.requires_grad = t.requires_grad
        return out
    return tensors_map(nc, obj)


def _differentiable(obj) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor) and t.requires_grad]


def _grads(obj) -> list[torch.Tensor | None]:
    return [t.grad for t in _differentiable(obj)]


def _zero_grads(obj):
    for t in _differentiable(obj):
        t.grad = None


@pytest.mark.parametrize(CASE_ARGS, cases("test_non_contiguous_tensors"))
def test_non_contiguous_tensors(info, backend, dtype, training, inputs):
    """Non-contiguous inputs and output gradients give the same outputs, input gradients (atol 1e-4, as
    TestModule) and parameter gradients as contiguous ones, in every combination."""
    for s in case_samples("test_non_contiguous_tensors", info, backend, dtype, training, inputs,
                          requires_grad=True):
        fwd = (s.forward_input.args, s.forward_input.kwargs)
        m = build(info, s, backend).to(DEVICE).to(dtype)
        m.train(training)
        with freeze_rng_state():
            ref_out = m(*fwd[0], **fwd[1])
            grad_out = [torch.randn_like(o) for o in _differentiable(ref_out)]
            for o, g in zip(_differentiable(ref_out), grad_out):
                o.backward(g, retain_graph=True)
        ref_input_grads = copy.deepcopy(_grads(fwd))
        ref_param_grads = copy.deepcopy([p.grad for p in m.parameters()])
        nc_fwd, nc_grad_out = _make_non_contiguous(fwd), _make_non_contiguous(grad_out)
        assert all(not t.is_contiguous() for t in _differentiable(nc_fwd) + nc_grad_out)
        for (a, k), g_out in product([fwd, nc_fwd], [grad_out, nc_grad_out]):
            _zero_grads((a, k))
            _zero_grads(list(m.parameters()))
            with freeze_rng_state():
                out = m(*a, **k)
                for o, g in zip(_differentiable(out), copy.deepcopy(g_out), strict=True):
                    o.backward(g, retain_graph=True)
            torch.testing.assert_close(out, ref_out, **TM_TOL)
            torch.testing.assert_close(_grads((a, k)), ref_input_grads, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close([p.grad for p in m.parameters()], ref_param_grads, **TM_TOL)


def _gradient_jobs(test_name, info, backend, training, inputs, *, partial):
    """TestModule's gradient checks, as (module, flat inputs, function, what is differentiated) jobs for
    this case's `BUDGET`: in float64, the total derivative (inputs and every parameter), or
    (`partial`) the inputs and one parameter at a time, each job one parameter of one sample."""
    jobs = []
    for s in samples(info, torch.float64, requires_grad=True, training=training, inputs=inputs):
        if s.forward_input is None:
            continue
        kwargs = s.forward_input.kwargs
        names = [n for n, _ in build(info, s, backend).named_parameters()]
        names += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        jobs += [(s, n) for n in names] if partial else [(s, None)]
    for s, only in pick(jobs, test_name, backend, torch.float64, training):
        m = build(info, s, backend).to(DEVICE).to(torch.float64)
        m.train(training)
        params = tuple(m.parameters())
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        kw_tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        other_kwargs = {k: v for k, v in kwargs.items() if k not in kw_tensors}
        if only is not None:  # the positional inputs keep requires_grad; of the rest, only `only`
            for name, t in (*m.named_parameters(), *kw_tensors.items()):
                t.requires_grad_(name == only)
        flat, spec = pytree.tree_flatten(args + params + tuple(kw_tensors.values()))

        def fn(*flat_inputs, m=m, spec=spec, n_args=len(args), n_params=len(params), kw_names=list(kw_tensors)):
            # as TestModule: the module computes with its own parameters, which gradcheck perturbs in place
            a = pytree.tree_unflatten(list(flat_inputs), spec)
            with freeze_rng_state():
                out = m(*a[:n_args], **dict(zip(kw_names, a[n_args + n_params:])), **other_kwargs)
            return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        yield s, only or "all parameters", fn, flat


def _run_gradient_check(check, info, job):
    s, what, fn, flat = job
    # gradcheck/gradgradcheck are torch's test wrappers (batched-gradient checks on, fast mode unless the
    # ModuleInfo says otherwise); nondet_tol: TestModule uses the ModuleInfo's only with cuDNN or XPU
    assert check(fn, flat, nondet_tol=0.0, fast_mode=info.gradcheck_fast_mode), (s.constructor_input.kwargs, what)


# Through the interpreter a gradcheck costs seconds (two interpreted forwards per input tensor), so the
# kernels take fewer cases of the gradient tests: training mode only (the module reads `training` only for
# dropout between layers, 0 in every sample, so eval runs the same kernels; test_non_contiguous_tensors
# runs their backward in eval mode), and second-order checks on module_db's samples only (a
# differentiated gradient is taken from a recomputation in PyTorch ops on every backend; the kernels
# compute only its forward there).
KERNEL_GRAD_CASES = [(True, "module_db"), (True, "packed")]
KERNEL_GRADGRAD_CASES = [(True, "module_db")]


@pytest.mark.parametrize(CASE_ARGS, cases("test_grad", dtypes=[torch.float64], kernel_cases=KERNEL_GRAD_CASES))
def test_grad(info, backend, dtype, training, inputs):
    """gradcheck (with batched gradients) of every output w.r.t. the inputs and all parameters."""
    for job in _gradient_jobs("test_grad", info, backend, training, inputs, partial=False):
        _run_gradient_check(gradcheck, info, job)


@pytest.mark.parametrize(CASE_ARGS, cases("test_grad", dtypes=[torch.float64], kernel_cases=KERNEL_GRADGRAD_CASES))
def test_grad_partial(info, backend, dtype, training, inputs):
    """gradcheck w.r.t. the inputs and one parameter, the others not requiring gradients."""
    for job in _gradient_jobs("test_grad_partial", info, backend, training, inputs, partial=True):
        _run_gradient_check(gradcheck, info, job)


GRADGRAD_CASES = [c for c in cases("test_gradgrad", dtypes=[torch.float64], kernel_cases=KERNEL_GRADGRAD_CASES)
                  if c.values[0].supports_gradgrad]


@pytest.mark.parametrize(CASE_ARGS, GRADGRAD_CASES)
def test_gradgrad(info, backend, dtype, training, inputs):
    """gradgradcheck (with batched gradients) w.r.t. the inputs and all parameters."""
    for job in _gradient_jobs("test_gradgrad", info, backend, training, inputs, partial=False):
        _run_gradient_check(gradgradcheck, info, job)


@pytest.mark.parametrize(CASE_ARGS, GRADGRAD_CASES)
def test_gradgrad_partial(info, backend, dtype, training, inputs):
    """gradgradcheck w.r.t. the inputs and one parameter, the others not requiring gradients (as with a
    frozen parameter and a gradient penalty)."""
    for job in _gradient_jobs("test_gradgrad_partial", info, backend, training, inputs, partial=True):
        _run_gradient_check(gradgradcheck, info, job)


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
def test_check_inplace(info):
    """TestModule runs its in-place check only for modules whose constructor takes `inplace`."""
    if "inplace" not in inspect.signature(info.module_cls).parameters:
        pytest.skip(f"{info.name} has no `inplace` argument: TestModule's test_check_inplace does not apply")
    pytest.fail(f"{info.name} takes `inplace`: write TestModule's in-place check for it here")


@pytest.mark.parametrize(CASE_ARGS, cases("test_memory_format"))
def test_memory_format(info, backend, dtype, training, inputs):
    """`m.to(memory_format=...)` (preserve, contiguous: no input here is 4-D or 5-D, so no channels-last)
    keeps outputs and (training) gradients, and every output and gradient is contiguous."""
    for s in case_samples("test_memory_format", info, backend, dtype, training, inputs, requires_grad=True):
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        assert not any(isinstance(t, torch.Tensor) and t.dim() in (4, 5) for t in pytree.tree_leaves((args, kwargs)))
        with freeze_rng_state():
            m = build(info, s, backend).to(DEVICE).to(dtype)
            m.train(training)
            ref_out = m(*args, **kwargs)
            grad_out = [torch.rand_like(t) for t in _differentiable(ref_out)]
            ref_grads = None
            if training and grad_out:
                ref_grads = torch.autograd.grad(_differentiable(ref_out), _differentiable((args, kwargs, list(
                    m.parameters()))), grad_out)
            for fmt in (torch.preserve_format, torch.contiguous_format):
                m.to(memory_format=fmt)
                out = m(*args, **kwargs)
                torch.testing.assert_close(out, ref_out, **TM_TOL)
                for t in pytree.tree_leaves(out):
                    assert not isinstance(t, torch.Tensor) or t.is_contiguous(), f"output {tuple(t.shape)}"
                if ref_grads is not None:
                    grads = torch.autograd.grad(_differentiable(out), _differentiable((args, kwargs, list(
                        m.parameters()))), grad_out)
                    torch.testing.assert_close(grads, ref_grads, **TM_TOL)
                    for g in grads:
                        assert g.is_contiguous(), f"gradient {tuple(g.shape)}"


@pytest.mark.parametrize(CASE_ARGS, cases("test_if_train_and_eval_modes_differ", training=(True,)))
def test_if_train_and_eval_modes_differ(info, backend, dtype, training, inputs):
    """Forward without a `training` attribute either works or fails on reading `training`, and then only
    if the ModuleInfo says train and eval differ (the consistency of that flag)."""
    for s in case_samples("test_if_train_and_eval_modes_differ", info, backend, dtype, training, inputs,
                          requires_grad=False):
        m = build(info, s, backend).to(DEVICE).to(dtype)
        m.train(training)
        delattr(m, "training")
        try:
            m(*s.forward_input.args, **s.forward_input.kwargs)
        except AttributeError as e:
            if "'training'" not in str(e):
                raise
            assert info.train_and_eval_differ, f"{info.name} reads `training` but the ModuleInfo says it does not"


@pytest.mark.parametrize("info", [i for i in INFOS if i.module_error_inputs_func is not None],
                         ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(info, backend, dtype):
    """Each error input raises the exception type and message the ModuleInfo lists for the torch class,
    at construction or in forward. (The error inputs do not depend on `training`, which TestModule also
    iterates over; the module stays in its default mode there too.)"""
    errors = info.module_error_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=False, training=True)
    assert errors
    for e in errors:
        s = e.module_error_input
        if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(e.error_type, match=e.error_regex):
                build(info, s, backend)
        elif e.error_on == ModuleErrorEnum.FORWARD_ERROR:
            m = build(info, s, backend)
            with pytest.raises(e.error_type, match=e.error_regex):
                m(*s.forward_input.args, **s.forward_input.kwargs)
        else:
            raise NotImplementedError(f"unknown error_on {e.error_on}")


def _to_by_hand(m, device, dtype, set_grad):
    """New Parameters/buffers in `device`/`dtype` without `Module.to` (the method under test)."""
    for c in m.children():
        _to_by_hand(c, device, dtype, set_grad)
    for name, p in list(m.named_parameters(recurse=False)):
        new = torch.nn.Parameter(p.detach().clone().to(device, dtype))
        setattr(m, name, new)
        if set_grad:
            new.grad = torch.randn_like(new)
    for name, b in list(m.named_buffers(recurse=False)):
        setattr(m, name, b.detach().clone().to(device, dtype))


@pytest.mark.parametrize(CASE_ARGS, cases("test_to", dtypes=[torch.float32], input_sets=["module_db"]))
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
@pytest.mark.parametrize("set_grad", [True, False], ids=["grad", "nograd"])
def test_to(info, backend, dtype, training, inputs, swap, set_grad, restore_swap_flag):
    """`m.to(device, dtype)` over every device and ModuleInfo dtype: parameters stay Parameters, in the
    new device/dtype, with their gradients; with the swap flag (`torch.__future__`) the same Python
    objects with swapped contents, without it the same objects (and storages where nothing changes).
    With swap and no preset gradients, `.to()` also works after a forward and backward. (Ours, beyond
    TestModule: afterwards the module still computes what the torch class does with its weights.)"""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.__future__.set_swap_module_params_on_conversion(swap)
    for s in case_samples("test_to", info, backend, dtype, training, inputs, requires_grad=False):
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        m = build(info, s, backend)
        _to_by_hand(m, DEVICE, dtype, set_grad)
        if swap and not set_grad:
            out = m(*args, **kwargs)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
            m.to(dtype=torch.half)
            m.to(dtype=torch.float32)
        prev = (DEVICE, dtype)
        for device_, dtype_ in product(devices, info.dtypes):
            grad_unchanged = (device_, dtype_) == prev
            prev = (device_, dtype_)
            ids, cdatas = [id(p) for p in m.parameters()], [p._cdata for p in m.parameters()]
            if set_grad:
                g_ids, g_cdatas = [id(p.grad) for p in m.parameters()], [p.grad._cdata for p in m.parameters()]
            m.to(device=device_, dtype=dtype_)
            params = list(m.parameters())
            assert all(isinstance(p, torch.nn.Parameter) for p in params)
            assert all(p.device.type == device_ and p.dtype == dtype_ for p in params)
            if set_grad:
                assert all(p.grad.device.type == device_ and p.grad.dtype == dtype_ for p in params)
            if swap:
                assert [id(p) for p in params] == ids, "swap keeps the Parameter objects"
                assert all(a != b for a, b in zip(cdatas, [p._cdata for p in params])), "swap swaps contents"
                if set_grad:
                    after = [p.grad._cdata for p in params]
                    assert all((a == b) if grad_unchanged else (a != b) for a, b in zip(g_cdatas, after))
            else:
                assert [p._cdata for p in params] == cdatas and [id(p) for p in params] == ids
                if set_grad:
                    assert [p.grad._cdata for p in params] == g_cdatas and [id(p.grad) for p in params] == g_ids
        m.to(DEVICE, dtype)
        close_to_twin(m(*args, **kwargs), twin(info, s, m)(*args, **kwargs), dtype, "after .to()")


def _meta_and_cpu_samples(test_name, info, backend, dtype, training, inputs):
    """(sample built under `torch.device('meta')`, the same sample on the CPU) pairs for this case."""
    with torch.device("meta"):
        meta = info.module_inputs_func(info, device=None, dtype=dtype, requires_grad=False, training=training)
    cpu = samples(info, dtype, requires_grad=False, training=training, inputs=inputs)
    return pick(list(zip(meta, cpu, strict=True)), test_name, backend, dtype, training)


@pytest.mark.parametrize(CASE_ARGS, cases("test_to_empty", dtypes=[torch.float32], input_sets=["module_db"]))
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_to_empty(info, backend, dtype, training, inputs, swap, restore_swap_flag):
    """A module built on the meta device, `to_empty(device=cpu)`: Parameters on the CPU in the dtype;
    swapped contents in the same objects with the swap flag, new objects without. (Ours, beyond
    TestModule: after `reset_parameters()` it computes what the torch class does with its weights.)"""
    torch.__future__.set_swap_module_params_on_conversion(swap)
    for s_meta, s in _meta_and_cpu_samples("test_to_empty", info, backend, dtype, training, inputs):
        with torch.device("meta"):
            m = build(info, s_meta, backend)
        ids, cdatas = [id(p) for p in m.parameters()], [p._cdata for p in m.parameters()]
        m.to_empty(device=torch.device(DEVICE))
        params = list(m.parameters())
        assert all(isinstance(p, torch.nn.Parameter) for p in params)
        assert all(p.device == torch.device(DEVICE) and p.dtype == dtype for p in params)
        assert all(a != b for a, b in zip(cdatas, [p._cdata for p in params]))
        if swap:
            assert [id(p) for p in params] == ids
        else:
            assert all(a != b for a, b in zip(ids, [id(p) for p in params]))
        m.reset_parameters()
        m.train(training)
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        close_to_twin(m(*args, **kwargs), twin(info, s, m)(*args, **kwargs), dtype, "after to_empty")


# ------------------------------------------------------------------------------------ TestModuleCPUOnly


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    else:
        assert a == b, f"{a!r} != {b!r}"


@pytest.mark.parametrize(CASE_ARGS, cases("test_device_ctx_init", input_sets=["module_db"]))
def test_device_ctx_init(info, backend, dtype, training, inputs):
    """Built under `with torch.device('meta')`: parameters and buffers on meta with the CPU module's
    metadata (shape, dtype, strides, storage offset, leaf-ness, requires_grad...)."""
    for s_meta, s in _meta_and_cpu_samples("test_device_ctx_init", info, backend, dtype, training, inputs):
        m_cpu = build(info, s, backend)
        with torch.device("meta"):
            m = build(info, s_meta, backend)
        pairs = [*zip(m.parameters(), m_cpu.parameters(), strict=True),
                 *zip(m.buffers(), m_cpu.buffers(), strict=True)]
        assert pairs
        for p_meta, p_cpu in pairs:
            assert p_meta.is_meta
            assert_metadata_eq(_assert_equal, p_meta, p_cpu)


# ------------------------------------------------------------------------------ needing an accelerator
# TestModule's device-transfer and CPU/GPU parity tests. backend='triton' insists on the kernels, which
# cannot run on these tests' CPU legs without the interpreter (which cannot run CUDA tensors): they take
# 'auto' (the kernels on CUDA) and 'torch'.

GPU_CASES = cases("test_cpu_gpu_parity", backends=["auto", "torch"])


@pytest.mark.cuda
@pytest.mark.parametrize(CASE_ARGS, GPU_CASES)
def test_multiple_device_transfer(info, backend, dtype, training, inputs):
    """GPU -> CPU -> GPU (-> a second GPU): the module runs on each and its parameters follow."""
    pairs = zip(samples(info, dtype, requires_grad=False, training=training, inputs=inputs, device="cuda"),
                samples(info, dtype, requires_grad=False, training=training, inputs=inputs), strict=True)
    for s_dev, s_cpu in pairs:
        with freeze_rng_state():
            m = build(info, s_dev, backend).to("cuda").to(dtype)
            m.train(training)
            m(*s_dev.forward_input.args, **s_dev.forward_input.kwargs)
            assert_params_and_buffers_are(m, torch.device("cuda", 0), dtype)
            m.cpu()
            m(*s_cpu.forward_input.args, **s_cpu.forward_input.kwargs)
            assert_params_and_buffers_are(m, "cpu", dtype)
            m.to("cuda")
            m(*s_dev.forward_input.args, **s_dev.forward_input.kwargs)
            assert_params_and_buffers_are(m, torch.device("cuda", 0), dtype)
            if torch.cuda.device_count() >= 2:
                m.to("cuda:1")
                with torch.cuda.device(1):
                    m(*tensors_map(lambda t: t.to("cuda:1"), s_dev.forward_input.args),
                      **tensors_map(lambda t: t.to("cuda:1"), s_dev.forward_input.kwargs))
                assert_params_and_buffers_are(m, "cuda:1", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(CASE_ARGS, GPU_CASES)
def test_cpu_gpu_parity(info, backend, dtype, training, inputs):
    """The same module and inputs on CPU and GPU (TF32 off): outputs and, five times over, the
    gradients of every output agree within TestModule's tolerances (atol 5e-2 fp32, 4e-4 fp64).
    TestModule skips eval mode for nn.RNN on cuDNN, which has no backward in eval mode; ours has one."""
    tol = {torch.float32: dict(atol=5e-2, rtol=1e-5), torch.float64: dict(atol=4e-4, rtol=1e-5)}[dtype]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for s in samples(info, dtype, requires_grad=True, training=training, inputs=inputs):
            cpu_in = (s.forward_input.args, s.forward_input.kwargs)
            gpu_in = tensors_map(lambda t: t.detach().to("cuda").requires_grad_(t.requires_grad), cpu_in)
            cpu_m = build(info, s, backend).to(dtype).to("cpu").train(training)
            gpu_m = build(info, s, backend).to(dtype).to("cuda").train(training)
            gpu_m.load_state_dict(cpu_m.state_dict())
            cpu_out, gpu_out = cpu_m(*cpu_in[0], **cpu_in[1]), gpu_m(*gpu_in[0], **gpu_in[1])
            torch.testing.assert_close(gpu_out, cpu_out, check_device=False, **tol)
            for _ in range(5):
                for c, g in zip(_differentiable(cpu_out), _differentiable(gpu_out), strict=True):
                    go = torch.randn_like(c)
                    c.backward(go, retain_graph=True)
                    g.backward(go.to("cuda"), retain_graph=True)
                    torch.testing.assert_close(_grads(gpu_in), _grads(cpu_in), check_device=False, **tol)
                    torch.testing.assert_close([p.grad for p in gpu_m.parameters()],
                                               [p.grad for p in cpu_m.parameters()], check_device=False, **tol)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
