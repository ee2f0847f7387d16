"""The autograd contract beyond first-order backward: double backward (gradient penalties,
`gradgradcheck`), batched gradients (`is_grads_batched=True`), `torch.func` transforms (vmap, jacrev,
per-sample gradients, ensembles over weights), and empty batches, on both backends.

How: first-order backward runs the kernels (or the PyTorch path's hand-written BPTT); a gradient that is
itself differentiated, batched or transformed is taken from a differentiable recomputation
(`torch_backend.differentiable_layer`), and `torch.func.vmap` over inputs folds the samples into the
batch of one launch (`functional._EagerLayer.vmap`)."""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch.func import functional_call

import fused_birnn

F64 = torch.float64


def pair(backend, *args, **kwargs):
    """A fused_birnn.RNN and an nn.RNN with the same float64 weights."""
    ours = fused_birnn.RNN(*args, dtype=F64, backend=backend, **kwargs)
    ref = torch.nn.RNN(*args, dtype=F64, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_gradgradcheck(bidirectional, nonlinearity, backend):
    m = fused_birnn.RNN(2, 3, 2, nonlinearity=nonlinearity, bidirectional=bidirectional, dtype=F64,
                        backend=backend)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4 if bidirectional else 2, 2, 3, dtype=F64, requires_grad=True)

    def f(x, h0, *params):
        return functional_call(m, dict(zip(names, params)), (x, h0))

    assert torch.autograd.gradgradcheck(f, (x, h0, *params), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck_with_lengths(backend):
    m = fused_birnn.RNN(2, 3, 1, bidirectional=True, dtype=F64, backend=backend)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])
    assert torch.autograd.gradgradcheck(
        lambda x, *ps: functional_call(m, dict(zip(names, ps)), (x,), dict(lengths=lengths)), (x, *params),
        fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_training_step_matches_nn_rnn(backend):
    """A gradient-penalty training step, the case that once went wrong: every parameter gets nn.RNN's
    gradient (none was None, one was wrong)."""
    ours, ref = pair(backend, 2, 3, 2, bidirectional=True)
    x = torch.randn(5, 2, 2, dtype=F64, requires_grad=True)
    for m in (ours, ref):
        out, h_n = m(x)
        g = torch.autograd.grad(out.sum() + h_n.pow(2).sum(), x, create_graph=True)[0]
        (g.pow(2).sum() + out.pow(2).mean()).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    optimizer.step()  # the penalty's gradients train the model like any others


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_order_backward_still_runs_the_fast_path(backend, monkeypatch):
    """Only a differentiated, batched or transformed gradient takes the recomputation."""
    import fused_birnn.functional as functional

    def forbidden(*args, **kwargs):
        raise AssertionError("plain backward must not recompute")

    monkeypatch.setattr(functional, "_recomputed_gradients", forbidden)
    m = fused_birnn.RNN(2, 3, 2, bidirectional=True, backend=backend)
    out, h_n = m(torch.randn(4, 2, 2, requires_grad=True))
    (out.sum() + h_n.sum()).backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_is_grads_batched(backend):
    ours, ref = pair(backend, 2, 3, 2, bidirectional=True)
    x = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    results = []
    for m in (ours, ref):
        out, h_n = m(x, h0)
        v = torch.randn(6, *out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        results.append(torch.autograd.grad(out, (x, h0, *m.parameters()), v, is_grads_batched=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_vmap_over_inputs_states_and_lengths(batch_first, backend):
    """nn.RNN has no batching rule; compare with a loop over the samples."""
    ours, ref = pair(backend, 3, 4, 2, bidirectional=True, batch_first=batch_first)
    xs = torch.randn(5, 2, 6, 3, dtype=F64) if batch_first else torch.randn(5, 6, 2, 3, dtype=F64)
    h0s = torch.randn(5, 4, 2, 4, dtype=F64)
    out, h_n = torch.func.vmap(ours)(xs, h0s)
    # the sample dimension anywhere: innermost on x, out and h_n
    out_last, h_n_last = torch.func.vmap(ours, in_dims=(-1, 0), out_dims=-1)(xs.movedim(0, -1), h0s)
    for i in range(5):
        ref_out, ref_h_n = ref(xs[i], h0s[i])
        torch.testing.assert_close(out[i], ref_out)
        torch.testing.assert_close(h_n[i], ref_h_n)
        torch.testing.assert_close(out_last[..., i], ref_out)
        torch.testing.assert_close(h_n_last[..., i], ref_h_n)
    # unbatched h0, per-sample lengths
    x_tm = xs if not batch_first else xs.transpose(1, 2)
    lengths = torch.tensor([[6, 2], [1, 6], [3, 3], [6, 6], [2, 5]])
    out, h_n = torch.func.vmap(lambda x, n: ours(x, h0s[0], lengths=n))(xs, lengths)
    for i in range(5):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x_tm[i], lengths[i], enforce_sorted=False)
        ref_out, ref_h_n = ref(packed, h0s[0])
        ref_out = torch.nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=batch_first, total_length=6)[0]
        torch.testing.assert_close(out[i], ref_out)
        torch.testing.assert_close(h_n[i], ref_h_n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_then_backward(backend):
    """Gradients through the folded launch: the same as summing per-sample losses."""
    ours, ref = pair(backend, 3, 4, 1, bidirectional=True)
    xs = torch.randn(3, 5, 2, 3, dtype=F64)
    torch.func.vmap(ours)(xs)[0].pow(2).sum().backward()
    for x in xs:
        ref(x)[0].pow(2).sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jacrev_and_hessian(backend):
    ours, ref = pair(backend, 2, 3, 2, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=F64)
    torch.testing.assert_close(torch.func.jacrev(lambda x: ours(x)[0])(x),
                               torch.autograd.functional.jacobian(lambda x: ref(x)[0], x))
    x1 = torch.randn(3, 1, 2, dtype=F64)
    torch.testing.assert_close(torch.func.hessian(lambda x: ours(x)[1].sum())(x1),
                               torch.autograd.functional.hessian(lambda x: ref(x)[1].sum(), x1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_gradients_and_ensembles(backend):
    ours, ref = pair(backend, 2, 3, 1, bidirectional=True)
    weights = {n: p.detach() for n, p in ours.named_parameters()}
    xs = torch.randn(4, 5, 2, dtype=F64)

    def loss(module):
        return lambda w, x: functional_call(module, w, (x.unsqueeze(1),))[0].pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss(ours)), in_dims=(None, 0))(weights, xs)
    for i, x in enumerate(xs):
        expected = torch.func.grad(loss(ref))(weights, x)
        for name in weights:
            torch.testing.assert_close(per_sample[name][i], expected[name], msg=name)
    # an ensemble: vmap over stacked weights
    stacked = {n: torch.stack([w, w * 0.9]) for n, w in weights.items()}
    x = torch.randn(5, 2, 2, dtype=F64)
    out = torch.func.vmap(lambda w: functional_call(ours, w, (x,))[0])(stacked)
    for i in range(2):
        torch.testing.assert_close(out[i], functional_call(ref, {n: w[i] for n, w in stacked.items()}, (x,))[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_empty_batch_forward_and_backward(bidirectional, backend):
    """The gradient of `out.sum()` on an empty batch has stride 0: the launchers must not trip on it."""
    ours, ref = pair(backend, 3, 4, 2, bidirectional=bidirectional)
    x = torch.zeros(5, 0, 3, dtype=F64, requires_grad=True)
    out, h_n = ours(x)
    ref_out, ref_h_n = ref(x)
    assert out.shape == ref_out.shape and h_n.shape == ref_h_n.shape
    (out.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


def test_vmap_checks_every_samples_lengths():
    m = fused_birnn.RNN(3, 4, 1, bidirectional=True)
    lengths = torch.tensor([[6, 2], [7, 6]])  # the second sample's 7 exceeds T = 6
    with pytest.raises(ValueError, match="lengths must lie in"):
        torch.func.vmap(lambda x, n: m(x, lengths=n))(torch.randn(2, 6, 2, 3), lengths)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_with_a_frozen_parameter(backend):
    """Only what requires grad is differentiated; the frozen weight gets no gradient, the rest nn.RNN's."""
    ours, ref = pair(backend, 2, 3, 1, bidirectional=True)
    for m in (ours, ref):
        m.weight_hh_l0.requires_grad_(False)
        x = torch.randn(4, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        g = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)[0]
        g.pow(2).sum().backward()
    assert ours.weight_hh_l0.grad is None
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
