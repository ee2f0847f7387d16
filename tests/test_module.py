"""The module's contract beyond numerics: nn.RNN compatibility, errors, launch count, determinism,
eval-mode backward, dropout, the flat-parameter buffers and their fallback."""

import copy
import io
import pickle

import pytest
import torch
from conftest import CPU_BACKENDS

import fused_birnn
import fused_birnn.kernels.backward as kbwd
import fused_birnn.kernels.forward as kfwd
from fused_birnn.functional import INTERPRETER


def seed_model(backend="auto", **kw):
    return fused_birnn.RNN(25, 50, 4, batch_first=True, bidirectional=True, backend=backend, **kw)


def test_constructor_and_state_dict_match_nn_rnn():
    for kw in [dict(), dict(num_layers=3, bidirectional=True, bias=False, nonlinearity="relu")]:
        ref = torch.nn.RNN(5, 6, **kw)
        ours = fused_birnn.RNN(5, 6, **kw)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        assert repr(ours).startswith(repr(ref)[:-1])  # nn.RNN's repr, plus the nonlinearity if not tanh
    # positional arguments in nn.RNN's real order (nn.RNNBase's, proj_size before device), and nn.RNN's
    # initialisation range 1/sqrt(H)
    m = fused_birnn.RNN(3, 4, 2, "relu", False, True, 0.0, True, 0, None, torch.float64)
    assert (m.nonlinearity, m.bias, m.batch_first, m.bidirectional) == ("relu", False, True, True)
    assert m.weight_hh_l1_reverse.dtype == torch.float64
    assert all(p.abs().max() <= 0.5 for p in m.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_in_eval_mode(backend):
    m = seed_model(backend).eval()
    x = torch.randn(15, 5, 25, requires_grad=True)
    out, hn = m(x)
    (out.sum() + hn.sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    m = seed_model(backend)
    x = torch.randn(15, 5, 25)
    h0 = torch.randn(8, 15, 50)

    def once():
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        m.zero_grad()
        out, hn = m(xx, hh)
        ((out * out).sum() + hn.sum()).backward()
        return [out, hn, xx.grad, hh.grad] + [p.grad.clone() for p in m.parameters()]

    a, b = once(), once()
    assert all(torch.equal(u, v) for u, v in zip(a, b))


class CountLaunches:
    """Stands in for a @triton.jit kernel and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter.append(self.kernel)
            return launch(*args, **kwargs)
        return counted


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("bidirectional", [True, False])
def test_one_launch_per_layer_forward_and_backward(bidirectional, monkeypatch):
    launches = []
    for mod, name in [(kfwd, "birnn_fwd_kernel"), (kbwd, "birnn_bwd_kernel")]:
        monkeypatch.setattr(mod, name, CountLaunches(getattr(mod, name), launches))
    m = fused_birnn.RNN(4, 8, 3, bidirectional=bidirectional, backend="triton")
    out, hn = m(torch.randn(5, 2, 4, requires_grad=True))
    assert len(launches) == 3
    (out.sum() + hn.sum()).backward()
    assert len(launches) == 6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_between_layers(backend):
    m = fused_birnn.RNN(4, 8, 3, dropout=0.5, backend=backend)
    ref = torch.nn.RNN(4, 8, 3, dropout=0.5)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(m.eval()(x)[0], ref.eval()(x)[0])  # no dropout in eval
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.equal(a, b)  # dropout active in training
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(1)
    assert torch.equal(a, m(x)[0])


def test_params_are_views_of_flat_buffers_and_replacement_is_seen():
    m = fused_birnn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64)
    ref = torch.nn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    w_hh = m._layer_buffers[1][1]
    assert m.weight_hh_l1.data_ptr() == w_hh[0].data_ptr() and m.weight_hh_l1_reverse.data_ptr() == w_hh[1].data_ptr()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    # in-place edits, even through .data (which bypasses version counters), are seen
    with torch.no_grad():
        for mod in (m, ref):
            mod.weight_hh_l0.mul_(2)
            mod.bias_ih_l1_reverse.data.add_(1)
    torch.testing.assert_close(m(x), ref(x))
    # a replaced parameter (as in the seed post) is packed per call instead
    new = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
    m.weight_ih_l1_reverse = new
    ref.weight_ih_l1_reverse = new
    torch.testing.assert_close(m(x), ref(x))
    # and after .to() the module is flat again
    m.float()
    assert m.weight_ih_l1_reverse.data_ptr() == m._layer_buffers[1][0][1].data_ptr()


def test_parameters_tied_within_a_layer():
    """One Parameter under two names of the same layer cannot live in two buffer slots: that layer is
    packed per call, so in-place edits stay visible in both places."""
    m = fused_birnn.RNN(3, 4, 1, bidirectional=True, dtype=torch.float64)
    ref = torch.nn.RNN(3, 4, 1, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    for mod in (m, ref):
        mod.weight_hh_l0_reverse = mod.weight_hh_l0
    m.flatten_parameters()
    with torch.no_grad():
        m.weight_hh_l0.mul_(3)
        ref.weight_hh_l0.mul_(3)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x))


def test_pickle_deepcopy_save_load_half():
    m = fused_birnn.RNN(3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    expected = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(clone(x), expected)
        assert clone.weight_hh_l0.data_ptr() == clone._layer_buffers[0][1][0].data_ptr()
    m.double()
    assert m(x.double())[0].dtype == torch.float64


def test_non_contiguous_input_and_hx():
    m = fused_birnn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64)
    ref = torch.nn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 5, 2, dtype=torch.float64).permute(1, 2, 0)  # [5, 2, 3], not contiguous
    hx = torch.randn(4, 4, 2, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(m(x, hx), ref(x, hx))


def test_batch_of_zero_rows():
    m = fused_birnn.RNN(3, 4, 2, bidirectional=True)
    out, hn = m(torch.randn(5, 0, 3))
    assert out.shape == (5, 0, 8) and hn.shape == (4, 0, 4)


# ------------------------------------------------------------------------------------------- errors

def error_of(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_like_nn_rnn(backend):
    """Same exception type and message as nn.RNN for every mistake nn.RNN catches."""
    ours = fused_birnn.RNN(3, 4, 2, bidirectional=True, backend=backend)
    ref = torch.nn.RNN(3, 4, 2, bidirectional=True)
    cases = [
        lambda m: m(torch.randn(5, 2, 3, 1)),                    # rank 4
        lambda m: m(torch.randn(5)),                             # rank 1
        lambda m: m(torch.randn(5, 2, 7)),                       # feature size
        lambda m: m(torch.randn(5, 2, 3), torch.randn(3, 2, 4)),  # hx layers*directions
        lambda m: m(torch.randn(5, 2, 3), torch.randn(4, 3, 4)),  # hx batch
        lambda m: m(torch.randn(5, 2, 3), torch.randn(4, 2, 5)),  # hx hidden
        lambda m: m(torch.randn(5, 2, 3), torch.randn(4, 4)),     # 2-D hx with batched input
        lambda m: m(torch.randn(5, 3), torch.randn(4, 1, 4)),     # 3-D hx with unbatched input
        lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64)),  # input dtype vs weights
        lambda m: m(torch.randn(0, 2, 3)),                       # empty sequence
    ]
    for case in cases:
        e_ours, e_ref = error_of(lambda: case(ours)), error_of(lambda: case(ref))
        assert e_ours.type is e_ref.type and str(e_ours.value) == str(e_ref.value)


def test_errors_nn_rnn_leaves_obscure_are_clear():
    m = fused_birnn.RNN(3, 4, 1)
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) does not match input dtype \(torch.float32\)"):
        m(torch.randn(5, 2, 3), torch.randn(1, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a Tensor"):  # also an AttributeError, as nn.RNN's
        m([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_birnn.RNN(3, 4, backend="cudnn")
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        fused_birnn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout should be a number"):
        fused_birnn.RNN(3, 4, dropout=2.0)


@pytest.mark.skipif(not torch.backends.mps.is_available() and not torch.cuda.is_available(),
                    reason="needs a second device")
def test_device_mismatch_is_named():
    m = fused_birnn.RNN(3, 4, 1)
    dev = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(RuntimeError, match="input is on"):
        m(torch.randn(5, 2, 3, device=dev))


def test_device_mismatch_hx_meta():
    """hx on another device than input and weights: named before anything runs ('meta' stands in for
    a second device on a CPU-only machine)."""
    m = fused_birnn.RNN(3, 4, 1)
    with pytest.raises(RuntimeError, match="hx is on meta but the RNN's parameters are on cpu"):
        m(torch.randn(5, 2, 3), torch.empty(1, 2, 4, device="meta"))


def test_triton_backend_errors_where_it_cannot_run():
    if INTERPRETER:
        m = fused_birnn.RNN(3, 4, 1, dtype=torch.bfloat16, backend="triton")
        with pytest.raises(RuntimeError, match="backend='triton' supports"):
            m(torch.randn(5, 2, 3, dtype=torch.bfloat16))
        # auto falls back to the PyTorch path for bf16 on CPU
        out, _ = fused_birnn.RNN(3, 4, 1, dtype=torch.bfloat16)(torch.randn(5, 2, 3, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
    else:
        m = fused_birnn.RNN(3, 4, 1, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            m(torch.randn(5, 2, 3))


def test_long_sequence_on_the_pytorch_path():
    """T = 100,000 (past cuDNN's 65,536 limit) forward and backward on the PyTorch path, checked at
    the two ends of the sequence against a short run (the reverse direction's end state only depends
    on the last steps it read; with contractive weights the first steps forget h0). The kernels take
    T as a runtime argument; T >= 65,536 with int64 offsets on a GPU is tests/test_cuda.py's."""
    m = fused_birnn.RNN(2, 4, 1, bidirectional=True, dtype=torch.float64, backend="torch")
    with torch.no_grad():
        m.weight_hh_l0.mul_(0.3)
        m.weight_hh_l0_reverse.mul_(0.3)
    T = 100_000
    x = torch.randn(T, 1, 2, dtype=torch.float64, requires_grad=True)
    out, h_n = m(x)
    assert out.shape == (T, 1, 8) and torch.isfinite(out).all()
    head, _ = m(x[:50].detach())  # the forward direction's first 50 steps do not depend on later input
    torch.testing.assert_close(out[:50, :, :4], head[:, :, :4])
    tail, _ = m(x[-50:].detach())  # the reverse direction's last 50 steps read only the last 50 inputs
    torch.testing.assert_close(out[-50:, :, 4:], tail[:, :, 4:])
    (out.sum() + h_n.sum()).backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
