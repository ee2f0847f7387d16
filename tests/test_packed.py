"""Variable-length batches: PackedSequence and lengths= against nn.RNN on packed input (float64
reference), on both CPU paths; the kernels' lengths mode at odd shapes; bad lengths."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fused_birnn
import fused_birnn.kernels.backward as kbwd
import fused_birnn.kernels.forward as kfwd
from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels.config import RecurrenceConfig

LENGTHS = {
    "sorted": [6, 5, 3, 3, 1],
    "unsorted-with-1": [2, 6, 1, 4, 6],
    "all-equal": [4, 4, 4],
    "one-row": [3],
    "two-tiles": [7, 1, 3, 7, 2, 5, 6, 4, 1, 2, 3, 7, 6, 5, 4, 3, 2, 1],  # B = 18 > BLOCK_B
}


def pair(num_layers, bidirectional, batch_first, backend, dtype=torch.float64, nonlinearity="tanh"):
    ref = torch.nn.RNN(3, 5, num_layers, nonlinearity=nonlinearity, batch_first=batch_first,
                       bidirectional=bidirectional, dtype=torch.float64)
    ours = fused_birnn.RNN(3, 5, num_layers, nonlinearity=nonlinearity, batch_first=batch_first,
                           bidirectional=bidirectional, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def packed_run(model, x, h0, lengths, batch_first, enforce_sorted, grad_out, grad_hn):
    """Pack, run, unpack; gradients of <padded out, grad_out> + <h_n, grad_hn>."""
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    out, hn = model(packed, h0)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    padded, out_lengths = pad_packed_sequence(out, batch_first=batch_first)
    assert out_lengths.tolist() == list(lengths)
    inputs = [x] + ([h0] if h0 is not None else []) + list(model.parameters())
    loss = (padded * grad_out.to(padded.dtype)).sum() + (hn * grad_hn.to(hn.dtype)).sum()
    return [padded, hn, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, True), (2, True), (3, True), (2, False)],
                         ids=["L1-bi", "L2-bi", "L3-bi", "L2-uni"])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_packed_parity(name, num_layers, bidirectional, batch_first, backend):
    lengths = LENGTHS[name]
    B, T = len(lengths), max(lengths)
    D = 2 if bidirectional else 1
    enforce_sorted = lengths == sorted(lengths, reverse=True)
    ref, ours = pair(num_layers, bidirectional, batch_first, backend)
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=torch.float64)
    h0 = torch.randn(num_layers * D, B, 5, dtype=torch.float64)
    grad_out = torch.randn((B, T, D * 5) if batch_first else (T, B, D * 5), dtype=torch.float64)
    grad_hn = torch.randn(num_layers * D, B, 5, dtype=torch.float64)
    expected = packed_run(ref, x, h0, lengths, batch_first, enforce_sorted, grad_out, grad_hn)
    got = packed_run(ours, x, h0, lengths, batch_first, enforce_sorted, grad_out, grad_hn)
    names = ["output", "h_n", "grad input", "grad h0"] + [n for n, _ in ours.named_parameters()]
    for n, a, e in zip(names, got, expected, strict=True):
        assert_close(a, e, torch.float64, n)

    # the padded form: lengths= on the unpacked input gives the same outputs and gradients
    xx = x.clone().requires_grad_()
    hh = h0.clone().requires_grad_()
    out, hn = ours(xx, hh, lengths=torch.tensor(lengths))
    loss = (out * grad_out).sum() + (hn * grad_hn).sum()
    grads = torch.autograd.grad(loss, [xx, hh] + list(ours.parameters()))
    for n, a, e in zip(names, [out, hn, *grads], expected, strict=True):
        assert_close(a, e, torch.float64, f"lengths= {n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_sequence_fp32_relu_no_hx(backend):
    ref, ours = pair(2, True, False, backend, dtype=torch.float32, nonlinearity="relu")
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 2, 4)]
    r_out, r_hn = ref(pack_sequence(seqs, enforce_sorted=False))
    o_out, o_hn = ours(pack_sequence([s.float() for s in seqs], enforce_sorted=False))
    assert_close(o_out.data, r_out.data, torch.float32, "output")
    assert_close(o_hn, r_hn, torch.float32, "h_n")
    assert torch.equal(o_out.sorted_indices, r_out.sorted_indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_dropout_and_eval(backend):
    """Dropout between layers applies to packed input too (and not in eval mode)."""
    m = fused_birnn.RNN(3, 5, 3, dropout=0.5, bidirectional=True, backend=backend)
    ref = torch.nn.RNN(3, 5, 3, dropout=0.5, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    packed = pack_sequence([torch.randn(n, 3) for n in (4, 3, 1)])
    torch.testing.assert_close(m.eval()(packed)[1], ref.eval()(packed)[1])
    m.train()
    assert not torch.equal(m(packed)[1], m(packed)[1])


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("block_h", [16, 32])
def test_packed_streamed_w_hh(block_h, monkeypatch):
    """The streamed kernels' lengths mode (carrying a waiting row's state through the ping-pong
    workspace), forced at small H."""
    cfg = RecurrenceConfig(block_b=16, block_h=block_h, w_on_chip=False)
    monkeypatch.setattr(kfwd, "select_config", lambda *a: cfg)
    monkeypatch.setattr(kbwd, "select_config", lambda *a: cfg)
    test_packed_parity("two-tiles", 2, True, False, "triton")
    test_packed_parity("unsorted-with-1", 1, True, True, "triton")


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
def test_padding_outside_lengths_is_never_read_or_written():
    """NaN in the padded input steps must not reach any output or gradient; padded outputs are 0."""
    m = fused_birnn.RNN(3, 5, 2, bidirectional=True, dtype=torch.float64, backend="triton")
    lengths = torch.tensor([4, 2, 3])
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        x[n:, b] = float("nan")
    x.requires_grad_()
    out, hn = m(x, lengths=lengths)
    assert torch.isfinite(hn).all()
    for b, n in enumerate(lengths.tolist()):
        assert torch.isfinite(out[:n, b]).all() and (out[n:, b] == 0).all()
    (out.sum() + hn.sum()).backward()
    for b, n in enumerate(lengths.tolist()):
        assert torch.isfinite(x.grad[:n, b]).all() and (x.grad[n:, b] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_lengths(backend):
    m = fused_birnn.RNN(3, 5, 1, bidirectional=True, backend=backend)
    x = torch.randn(4, 3, 3)
    cases = [
        (torch.tensor([4, 5, 1]), r"lengths must lie in \[1, 4\].*from 1 to 5"),
        (torch.tensor([4, 0, 1]), r"lengths must lie in \[1, 4\].*from 0 to 4"),
        (torch.tensor([4, -2, 1]), r"lengths must lie in \[1, 4\]"),
        (torch.tensor([4, 2]), r"1-D tensor of the batch size 3, got shape \(2,\)"),
        (torch.tensor([[4, 2, 1]]), r"1-D tensor of the batch size 3"),
        (torch.tensor([4.0, 2.0, 1.0]), r"integer tensor, got dtype torch.float32"),
        (torch.tensor([4, 2, 1], device="meta"), r"on the CPU or on the input's device \(cpu\), got meta"),
    ]
    for lengths, match in cases:
        with pytest.raises(ValueError, match=match):
            m(x, lengths=lengths)
    with pytest.raises(ValueError, match="lengths= needs a batched 3-D input"):
        m(torch.randn(4, 3), lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match="either a PackedSequence or lengths="):
        m(pack_sequence([torch.randn(2, 3)]), lengths=torch.tensor([2]))
