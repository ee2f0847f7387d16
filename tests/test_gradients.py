"""torch.autograd.gradcheck in float64 through the whole module (flat buffers, the autograd Function and
the recurrence), for the kernels under the interpreter and for the pure-PyTorch path."""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch.func import functional_call

import fused_birnn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_gradcheck(bidirectional, nonlinearity, backend):
    m = fused_birnn.RNN(3, 5, 2, nonlinearity=nonlinearity, bidirectional=bidirectional,
                        dtype=torch.float64, backend=backend)
    D = 2 if bidirectional else 1
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * D, 2, 5, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *params):
        return functional_call(m, dict(zip(names, params)), (x, h0))

    assert torch.autograd.gradcheck(f, (x, h0, *params), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_full_single_layer(backend):
    """Slow-mode gradcheck (every Jacobian entry) on one small bidirectional layer."""
    m = fused_birnn.RNN(2, 3, 1, bidirectional=True, dtype=torch.float64, backend=backend)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, h0, *ps: functional_call(m, dict(zip(names, ps)), (x, h0)), (x, h0, *params))
