"""Shared fixtures. The Triton interpreter must be chosen before any kernel is decorated (NOTES 4):
the CPU suite runs the kernels interpreted; a GPU run sets TRITON_INTERPRET=0 and selects `-m cuda`."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
