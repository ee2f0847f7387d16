"""`convert` / `to_torch`: every exact nn.RNN / nn.LSTM / nn.GRU swapped (root, Sequential, ModuleDict,
shared), same numbers, same Parameter objects and mode; everything else left alone and reported."""

import copy
import warnings

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close
from torch import nn
from torch.nn.utils import parametrize

import fused_birnn
from fused_birnn.convert import convert, to_torch

HYPER = ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
         "bidirectional", "training")


class Encoder(nn.Module):
    """An nn.RNN inside a Sequential and one inside a ModuleDict, with other layers around them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(3, 4), nn.RNN(4, 5, 2, nonlinearity="relu", bidirectional=True))
        self.heads = nn.ModuleDict({
            "seq": nn.RNN(10, 3, batch_first=True, bias=False),
            "deep": nn.RNN(10, 4, 3, dropout=0.3, bidirectional=True),
        })

    def forward(self, x):  # x: [T, B, 3]
        h, _ = self.embed(x)
        a, ha = self.heads["seq"](h.transpose(0, 1))
        b, hb = self.heads["deep"](h)
        return torch.cat([a.flatten(), ha.flatten(), b.flatten(), hb.flatten()])


def rnns(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.RNNBase)}


def run_with_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype)).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_run(model, original, x):
    """`model` gives `original`'s output and parameter gradients on `x`."""
    out, grads = run_with_grads(model, x)
    ref_out, ref_grads = run_with_grads(original, x)
    assert_close(out, ref_out, torch.float64, "output")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, torch.float64, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_round_trip_nested(backend):
    model = Encoder().double()
    model.heads["deep"].eval()  # dropout inactive, so outputs are comparable; mode must survive
    frozen = model.embed[1].weight_hh_l1_reverse.requires_grad_(False)
    original = copy.deepcopy(model)
    params = dict(model.named_parameters())
    x = torch.randn(6, 2, 3, dtype=torch.float64)

    assert convert(model, backend=backend) is model
    for name, m in rnns(model).items():
        old = rnns(original)[name]
        assert type(m) is fused_birnn.RNN and m.backend == backend
        assert [getattr(m, a) for a in HYPER] == [getattr(old, a) for a in HYPER]
    assert dict(model.named_parameters()) == params  # the same Parameter objects, same names
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not frozen.requires_grad and frozen.data_ptr() == model.embed[1]._layer_buffers[1][1][1].data_ptr()
    assert_same_run(model, original, x)

    back = to_torch(model)
    assert back is model and all(type(m) is nn.RNN for m in rnns(back).values())
    assert dict(back.named_parameters()) == params
    for name, m in rnns(back).items():
        assert [getattr(m, a) for a in HYPER] == [getattr(rnns(original)[name], a) for a in HYPER]
        # each parameter owns a contiguous storage again, as nn.RNN builds them
        assert all(p.is_contiguous() and p.untyped_storage().nbytes() == p.nbytes for p in m.parameters())
    sd, ref_sd = back.state_dict(), original.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert torch.equal(back(x), original(x))  # nn.RNN again: the same kernels, bit for bit


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_root_is_rnn(backend):
    rnn = nn.RNN(3, 4, 2, batch_first=True, bidirectional=True, dtype=torch.float64).eval()
    original = copy.deepcopy(rnn)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    fused = convert(rnn, backend=backend)
    assert type(fused) is fused_birnn.RNN and not fused.training
    assert fused.weight_ih_l1_reverse is rnn.weight_ih_l1_reverse
    for a, b in zip(fused(x), original(x)):
        assert_close(a, b, torch.float64, "root")
    back = to_torch(fused)
    assert type(back) is nn.RNN and not back.training
    assert all(torch.equal(a, b) for a, b in zip(back(x), original(x)))


class Tagger(nn.Module):
    """A projected bidirectional LSTM feeding a GRU, and a bias-free batch-first GRU beside them."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 5, 2, bidirectional=True, proj_size=2))
        self.decoders = nn.ModuleList([nn.GRU(4, 3, 2, bidirectional=True, dropout=0.5),
                                       nn.GRU(7, 3, bias=False, batch_first=True)])

    def forward(self, x):  # x: [T, B, 3]
        h, (h_n, c_n) = self.encoder(x)
        a, ha = self.decoders[0](h)
        b, hb = self.decoders[1](torch.cat([x, h], -1).transpose(0, 1))
        return torch.cat([t.flatten() for t in (a, ha, b, hb, h_n, c_n)])


GATED_HYPER = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional", "proj_size", "training")


def test_round_trip_lstm_gru():
    """nn.LSTM (proj_size, bidirectional) and nn.GRU (bias off, batch_first, dropout) nested: swapped for
    fused_birnn.LSTM / GRU with the same hyperparameters, mode and Parameter objects, same outputs and
    gradients, and back to torch.nn with each parameter in a storage of its own."""
    model = Tagger().double()
    model.decoders[0].eval()  # dropout inactive, so outputs are comparable; mode must survive
    original = copy.deepcopy(model)
    params = dict(model.named_parameters())
    x = torch.randn(6, 2, 3, dtype=torch.float64)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything converts: no warning
        assert convert(model, backend="torch") is model
    expected = {"encoder.1": fused_birnn.LSTM, "decoders.0": fused_birnn.GRU, "decoders.1": fused_birnn.GRU}
    assert {n: type(m) for n, m in rnns(model).items()} == expected
    for name, m in rnns(model).items():
        assert m.backend == "torch"
        assert [getattr(m, a) for a in GATED_HYPER] == [getattr(rnns(original)[name], a) for a in GATED_HYPER]
    assert dict(model.named_parameters()) == params  # the same Parameter objects, same names
    assert_same_run(model, original, x)

    back = to_torch(model)
    assert back is model
    assert {n: type(m) for n, m in rnns(back).items()} == {
        "encoder.1": nn.LSTM, "decoders.0": nn.GRU, "decoders.1": nn.GRU}
    assert dict(back.named_parameters()) == params
    for name, m in rnns(back).items():
        assert [getattr(m, a) for a in GATED_HYPER] == [getattr(rnns(original)[name], a) for a in GATED_HYPER]
        assert all(p.is_contiguous() and p.untyped_storage().nbytes() == p.nbytes for p in m.parameters())
    sd, ref_sd = back.state_dict(), original.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert torch.equal(back(x), original(x))  # torch.nn again: the same kernels, bit for bit


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_root_is_lstm_or_gru(cell):
    rnn = getattr(nn, cell)(3, 4, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = rnn(x)
    fused = convert(rnn, backend="torch")
    assert type(fused) is getattr(fused_birnn, cell) and not fused.training
    assert fused.weight_hh_l0 is rnn.weight_hh_l0
    out, state = fused(x)
    assert_close(out, expected[0], torch.float64, "output")
    back = to_torch(fused)
    assert type(back) is getattr(nn, cell) and not back.training
    assert torch.equal(back(x)[0], expected[0])


class Doubling(nn.RNN):
    def forward(self, input, hx=None):
        return super().forward(2 * input, hx)


class PeepholeLSTM(nn.LSTM):
    pass


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).t()


def test_unconvertible_modules_are_left_alone_and_reported():
    hooked = nn.RNN(4, 4)
    hooked.register_forward_hook(lambda mod, args, out: out)
    parametrized = nn.RNN(4, 4)  # carried over (tests/test_weight_transforms.py), so not left
    parametrize.register_parametrization(parametrized, "weight_hh_l0", Symmetric())
    deleted = nn.RNN(4, 4)
    del deleted.weight_hh_l0
    mixed = nn.RNN(4, 4)
    mixed.bias_hh_l0.data = mixed.bias_hh_l0.data.double()
    mixed_gru = nn.GRU(4, 4)
    mixed_gru.weight_ih_l0.data = mixed_gru.weight_ih_l0.data.double()
    left = {"base": nn.RNNBase("LSTM", 4, 4), "lstm_sub": PeepholeLSTM(4, 4), "sub": Doubling(4, 4),
            "hooked": hooked, "deleted": deleted, "mixed": mixed, "mixed_gru": mixed_gru}
    reasons = {"base": "RNNBase has no fused version (only RNN, LSTM, GRU)",
               "lstm_sub": "PeepholeLSTM subclasses torch.nn.LSTM",
               "sub": "Doubling subclasses torch.nn.RNN",
               "hooked": "has module hooks registered on it (function in _forward_hooks), which would not carry "
                         "over (they may hold the old module): convert first, then register them on the "
                         "fused_birnn.RNN",
               "deleted": "its weight_hh_l0 is neither a Parameter, a parametrization nor set by",
               "mixed": "its parameters mix dtypes or devices (float32 on cpu, float64 on cpu)",
               "mixed_gru": "its parameters mix dtypes or devices (float32 on cpu, float64 on cpu)"}
    model = nn.Sequential(nn.ModuleDict({**left, "parametrized": parametrized}), nn.RNN(4, 4))

    with pytest.warns(UserWarning, match=r"left 7 module\(s\) unchanged") as record:
        assert convert(model) is model
    message = str(record[0].message)
    assert all(f"'0.{k}': {r}" in message for k, r in reasons.items()), message
    assert all(model[0][k] is m for k, m in left.items()) and type(model[1]) is fused_birnn.RNN
    assert isinstance(model[0]["parametrized"], fused_birnn.RNN)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # report=True: the caller gets the list, no warning
        result, skipped = convert(model, report=True)
        assert result is model and [n for n, _ in skipped] == [f"0.{k}" for k in left]
        assert all(r in why for (_, why), r in zip(skipped, reasons.values()))
        assert convert(nn.Linear(2, 2), report=True)[1] == []
        convert(nn.Sequential(nn.RNN(2, 2)))  # nothing skipped: no warning
    with pytest.warns(UserWarning, match=r"'<root>': PeepholeLSTM subclasses torch.nn.LSTM"):
        convert(PeepholeLSTM(2, 2))


def test_shared_module_and_tied_weights_stay_shared():
    shared = nn.RNN(3, 4, dtype=torch.float64)
    a, b = nn.RNN(3, 4, dtype=torch.float64), nn.RNN(3, 4, dtype=torch.float64)
    b.weight_ih_l0 = a.weight_ih_l0  # tied across modules
    model = nn.ModuleDict({"first": nn.Sequential(shared, a), "second": nn.ModuleList([shared, b])})
    original = copy.deepcopy(model)
    convert(model, backend="torch")
    assert model["first"][0] is model["second"][0] and type(model["first"][0]) is fused_birnn.RNN
    assert model["first"][1].weight_ih_l0 is model["second"][1].weight_ih_l0
    assert len(list(model.parameters())) == len(list(original.parameters()))
    with torch.no_grad():  # an update through the tie reaches both modules
        model["first"][1].weight_ih_l0.mul_(-2)
        original["first"][1].weight_ih_l0.mul_(-2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for path in [("first", 1), ("second", 1), ("second", 0)]:
        ours, ref = model[path[0]][path[1]], original[path[0]][path[1]]
        assert_close(ours(x)[0], ref(x)[0], torch.float64, str(path))


def test_optimizer_built_before_convert_keeps_training():
    model = nn.Sequential(nn.Linear(3, 3), nn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64))
    model[0].double()
    ref = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def step(m, opt):
        opt.zero_grad()
        m(x)[0].square().sum().backward()
        opt.step()

    for m, opt in zip((model, ref), opts):
        step(m, opt)  # momentum buffers now exist
    rng = torch.get_rng_state()
    convert(model, backend="torch")
    assert torch.equal(torch.get_rng_state(), rng)  # building the new modules draws no random numbers
    for _ in range(2):
        for m, opt in zip((model, ref), opts):
            step(m, opt)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, torch.float64, n)


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(nn.RNN(2, 2), backend="cudnn")
