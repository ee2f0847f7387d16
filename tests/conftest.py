"""Shared fixtures. The Triton interpreter must be chosen before any kernel is decorated (NOTES 4):
the CPU suite runs the kernels interpreted; a GPU run sets TRITON_INTERPRET=0 and selects `-m cuda`."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# backend='auto' measures each call shape on first sight (fused_birnn.tune): the suite runs its default choice
# instead, so that which path a test takes does not depend on timings, and writes no decision file;
# tests/test_tune.py switches measuring on where it tests it
os.environ.setdefault("FUSED_BIRNN_AUTOTUNE", "0")
os.environ.setdefault("FUSED_BIRNN_TUNE_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from fused_birnn.functional import INTERPRETER  # noqa: E402

# per-dtype tolerances (atol, rtol) against a float64 reference
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}

# the backends a CPU test can run: the kernels only through the interpreter
CPU_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")),
    "torch",
]


def pytest_collection_modifyitems(config, items):
    cuda_ok = torch.cuda.is_available() and not INTERPRETER
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET=0")
    for item in items:
        if "cuda" in item.keywords and not cuda_ok:
            item.add_marker(skip)


@pytest.fixture
def aten_calls(monkeypatch):
    """`backend='auto'` on a CPU as if the interpreter were off (what `auto` reads, as the bench's timing
    does): the list of calls into ATen's RNN functions (`torch._VF.rnn_tanh`, `lstm`, ...) from
    fused_birnn.rnn, by name."""
    import types

    import fused_birnn.functional as functional
    import fused_birnn.rnn as rnn_module

    calls = []
    real = rnn_module._VF

    def counted(name):
        def call(*args):
            calls.append(name)
            return getattr(real, name)(*args)
        return call

    monkeypatch.setattr(functional, "INTERPRETER", False)
    monkeypatch.setattr(rnn_module, "_VF", types.SimpleNamespace(
        **{name: counted(name) for name in rnn_module._ATEN.values()}))
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def outcome(fn):
    """`(result, None)` or `(None, exception)` of calling `fn`."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return None, e


def assert_same_outcome(ours, theirs, what):
    """Two `outcome`s, ours and torch's: where torch raises, ours raises the same type (a subclass is
    fine) with a message; where torch accepts, ours accepts. Returns both results (None where raised)."""
    (ours_result, ours_error), (ref_result, ref_error) = ours, theirs
    if ref_error is None:
        assert ours_error is None, f"{what}: torch accepts it, ours raised {ours_error!r}"
        return ours_result, ref_result
    assert ours_error is not None, f"{what}: torch raises {ref_error!r}, ours raised nothing"
    assert isinstance(ours_error, type(ref_error)), (
        f"{what}: torch raises {type(ref_error).__name__}, ours {type(ours_error).__name__}: {ours_error}")
    assert str(ours_error), f"{what}: an error without a message"
    return None, None


@pytest.fixture
def no_tf32():
    """fp32 GPU tests compare exact fp32 (cuDNN's and our TF32 switch off)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# GPU tests' accuracy criterion: against float64, our error may be at most twice cuDNN's own error in the
# same dtype plus this floor
CUDNN_FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_no_worse_than_cudnn(expected, theirs, mine, dtype, names=None):
    """`mine` and `theirs` (cuDNN) against `expected` (float64), tensor by tensor, scaled by the largest
    expected value: ours within twice cuDNN's error plus `CUDNN_FLOOR[dtype]`."""
    names = names or [f"tensor {i}" for i in range(len(expected))]
    for name, e, t, m in zip(names, expected, theirs, mine, strict=True):
        scale = e.abs().max().item() + 1e-30
        err_ours = (m.double() - e).abs().max().item() / scale
        err_cudnn = (t.double() - e).abs().max().item() / scale
        assert err_ours <= 2 * err_cudnn + CUDNN_FLOOR[dtype], f"{name}: ours {err_ours:.2e}, cuDNN {err_cudnn:.2e}"
