"""Every bad argument of `fused_birnn.RNN`, table-driven against `nn.RNN`: the same exception type as
torch raises (a subclass is fine) with a message naming what was wrong, and where nn.RNN accepts an
argument, ours accepts it too and gives nn.RNN's result."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_same_outcome, outcome
from torch.nn.utils.rnn import pack_sequence

import fused_birnn

# (id, args, kwargs) of the constructor; each passed to nn.RNN and to fused_birnn.RNN
CONSTRUCTOR_CASES = [
    ("nonlinearity", (4, 5), dict(nonlinearity="sigmoid")),
    ("nonlinearity-positional", (4, 5, 1, "gelu"), {}),
    ("input_size-zero", (0, 5), {}),
    ("input_size-float", (4.0, 5), {}),
    ("hidden_size-negative", (4, -1), {}),
    ("hidden_size-str", (4, "5"), {}),
    ("num_layers-zero", (4, 5, 0), {}),
    ("bias-int", (4, 5), dict(bias=1)),
    ("batch_first-none", (4, 5), dict(batch_first=None)),
    ("dropout-above-one", (4, 5, 2), dict(dropout=1.5)),
    ("dropout-bool", (4, 5, 2), dict(dropout=True)),
    ("proj_size", (30, 20, 2), dict(proj_size=10)),
    ("proj_size-zero", (30, 20, 2), dict(proj_size=0)),
    ("proj_size-positional-none", (3, 4, 2, "relu", False, True, 0.0, True, None), {}),
    ("unknown-keyword", (4, 5), dict(hiden_size=3)),
    ("device", (4, 5), dict(device="no-such-device")),
    ("valid-positional", (3, 4, 2, "relu", False, True, 0.0, True, 0, None, torch.float64), {}),
    ("valid-keywords", (), dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("args, kwargs", [c[1:] for c in CONSTRUCTOR_CASES], ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_errors_match_nn_rnn(args, kwargs):
    ours, ref = assert_same_outcome(outcome(lambda: fused_birnn.RNN(*args, **kwargs)),
                                    outcome(lambda: torch.nn.RNN(*args, **kwargs)), f"RNN{args}, {kwargs}")
    if ref is not None:
        assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
            (n, p.shape, p.dtype) for n, p in ref.named_parameters()]


def test_proj_size_message_names_the_argument():
    with pytest.raises(ValueError, match="proj_size"):
        fused_birnn.RNN(30, 20, 2, proj_size=10)


def _packed(B=3, I=4):
    return pack_sequence([torch.randn(n, I) for n in (5, 3, 2)[:B]], enforce_sorted=False)


# (id, module kwargs, input factory, hx factory) for RNN(4, 5, 2, ...)
FORWARD_CASES = [
    ("input-1d", {}, lambda: torch.randn(4), None),
    ("input-4d", {}, lambda: torch.randn(3, 2, 4, 1), None),
    ("input-not-a-tensor", {}, lambda: [[0.0] * 4] * 3, None),
    ("input-features", {}, lambda: torch.randn(3, 2, 6), None),
    ("input-dtype", {}, lambda: torch.randn(3, 2, 4, dtype=torch.float64), None),
    ("input-int", {}, lambda: torch.ones(3, 2, 4, dtype=torch.int64), None),
    ("input-dtype-with-hx", {}, lambda: torch.randn(3, 2, 4, dtype=torch.float64), lambda: torch.randn(2, 2, 5)),
    ("input-empty-time", {}, lambda: torch.randn(0, 2, 4), None),
    ("input-empty-batch", {}, lambda: torch.randn(3, 0, 4), None),
    ("hx-2d-for-batched", {}, lambda: torch.randn(3, 2, 4), lambda: torch.randn(2, 5)),
    ("hx-3d-for-unbatched", {}, lambda: torch.randn(3, 4), lambda: torch.randn(2, 1, 5)),
    ("hx-layers", {}, lambda: torch.randn(3, 2, 4), lambda: torch.randn(3, 2, 5)),
    ("hx-batch", {}, lambda: torch.randn(3, 2, 4), lambda: torch.randn(2, 3, 5)),
    ("hx-hidden", {}, lambda: torch.randn(3, 2, 4), lambda: torch.randn(2, 2, 6)),
    ("hx-dtype", {}, lambda: torch.randn(3, 2, 4), lambda: torch.randn(2, 2, 5, dtype=torch.float64)),
    ("hx-not-a-tensor", {}, lambda: torch.randn(3, 2, 4), lambda: [[0.0] * 5] * 2),
    ("hx-bidirectional", dict(bidirectional=True), lambda: torch.randn(3, 2, 4), lambda: torch.randn(2, 2, 5)),
    ("batch-first-hx-batch", dict(batch_first=True), lambda: torch.randn(2, 3, 4), lambda: torch.randn(2, 3, 5)),
    ("packed-hx-batch", {}, _packed, lambda: torch.randn(2, 2, 5)),
    ("packed-features", {}, lambda: _packed(I=6), None),
    ("packed-hx-2d", {}, _packed, lambda: torch.randn(2, 5)),
    ("packed-hx-1d", {}, _packed, lambda: torch.randn(5)),
    ("packed-input-dtype-with-hx", {}, lambda: _packed().to(torch.float64), lambda: torch.randn(2, 3, 5)),
    ("valid-unbatched", {}, lambda: torch.randn(3, 4), lambda: torch.randn(2, 5)),
    ("valid-packed", dict(bidirectional=True), _packed, lambda: torch.randn(4, 3, 5)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("module_kwargs, make_input, make_hx", [c[1:] for c in FORWARD_CASES],
                         ids=[c[0] for c in FORWARD_CASES])
def test_forward_errors_match_nn_rnn(module_kwargs, make_input, make_hx, backend):
    ref = torch.nn.RNN(4, 5, 2, **module_kwargs)
    ours = fused_birnn.RNN(4, 5, 2, backend=backend, **module_kwargs)
    ours.load_state_dict(ref.state_dict())
    x = make_input()
    args = (x,) if make_hx is None else (x, make_hx())
    got, expected = assert_same_outcome(outcome(lambda: ours(*args)), outcome(lambda: ref(*args)), "forward")
    if expected is not None:
        (out, h_n), (ref_out, ref_h_n) = got, expected
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            out, ref_out = out.data, ref_out.data
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(h_n, ref_h_n)


@pytest.mark.parametrize("lengths, error", [
    (torch.tensor([3.0, 2.0]), ValueError),
    (torch.tensor([3, 2, 1]), ValueError),
    (torch.tensor([[3, 2]]), ValueError),
    (torch.tensor([4, 2]), ValueError),
    (torch.tensor([0, 2]), ValueError),
])
def test_lengths_errors(lengths, error):
    m = fused_birnn.RNN(4, 5)
    with pytest.raises(error, match="lengths"):
        m(torch.randn(3, 2, 4), lengths=lengths)
