"""The layer as PyTorch custom operators: `torch.library.opcheck` on the forward and the backward op,
no graph break under `torch._dynamo.explain`, `torch.compile(fullgraph=True)` forward + backward equal to
eager, and the flat-parameter fast path decided inside the op. (tests/test_compile.py is the unrelated
compile check of the kernels for sm_80/sm_90.)"""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close

import fused_birnn
from fused_birnn.functional import _joined, rnn_layer, rnn_layer_backward

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# (T, B, I, H, bidirectional, bias, params as the module's flat views, lengths, relu)
OP_CASES = {
    "bi-flat-lengths": (5, 3, 4, 6, True, True, True, [5, 2, 4], False),
    "uni-no-bias": (4, 2, 3, 5, False, False, False, None, False),
    "bi-separate-relu": (3, 2, 3, 4, True, True, False, None, True),
}


def op_inputs(T, B, I, H, bidirectional, bias, flat, lengths, dtype=torch.float64, x_dtype=None):
    """`rnn_layer` arguments: parameters of a one-layer module (its flat views, or separate tensors)."""
    m = fused_birnn.RNN(I, H, 1, bias=bias, bidirectional=bidirectional, dtype=dtype)
    params = [p if flat else p.detach().clone().requires_grad_() for ps in m._layer_params(0) for p in ps]
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=x_dtype or dtype, requires_grad=True)
    h0 = torch.randn(D, B, H, dtype=x_dtype or dtype, requires_grad=True)
    return x, h0, params, None if lengths is None else torch.tensor(lengths)


def check_ops(x, h0, params, lengths, relu, backend):
    """opcheck the forward op, then the backward op on the forward's outputs and random gradients,
    asking for every combination of input and weight gradients."""
    fwd = (x, h0, params, lengths, relu, backend)
    assert torch.library.opcheck(rnn_layer, fwd, test_utils=OPCHECK_UTILS) == {u: "SUCCESS" for u in OPCHECK_UTILS}
    out, h_n = rnn_layer(*fwd)
    saved = (x.detach(), h0.detach(), out.detach(), [p.detach() for p in params], lengths, relu, backend)
    for input_grad, weight_grads in [(True, True), (False, True), (True, False)]:
        bwd = (torch.randn_like(out), torch.randn_like(h_n), *saved, input_grad, weight_grads)
        result = torch.library.opcheck(rnn_layer_backward, bwd, test_utils=OPCHECK_UTILS)
        assert result == {u: "SUCCESS" for u in OPCHECK_UTILS}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(OP_CASES))
def test_opcheck(case, backend):
    *shape, lengths, relu = OP_CASES[case]
    check_ops(*op_inputs(*shape, lengths), relu, backend)


def test_opcheck_mixed_dtypes_as_under_autocast():
    """Under autocast the module passes bf16 x and h0 with the fp32 parameters: the op casts while
    packing and returns the weight gradients for the caller to cast back."""
    check_ops(*op_inputs(4, 3, 3, 5, True, True, True, [4, 1, 3], torch.float32, torch.bfloat16), False, "torch")


def test_flat_parameters_are_joined_without_a_copy():
    m = fused_birnn.RNN(3, 64, 2, bidirectional=True)  # 2 x 64 x 64 elements: above SMALL_JOIN
    w_hh = [m.weight_hh_l1, m.weight_hh_l1_reverse]
    joined = _joined(w_hh, torch.float32)
    assert joined.data_ptr() == w_hh[0].data_ptr() and torch.equal(joined, torch.cat(w_hh))
    m.weight_hh_l1_reverse = torch.nn.Parameter(m.weight_hh_l1_reverse.detach().clone())  # no longer adjacent
    separate = [m.weight_hh_l1, m.weight_hh_l1_reverse]
    joined = _joined(separate, torch.float32)
    assert joined.data_ptr() != separate[0].data_ptr() and torch.equal(joined, torch.cat(separate))
    tied = [m.weight_hh_l1, m.weight_hh_l1]
    assert torch.equal(_joined(tied, torch.float32), torch.cat(tied))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("wants", ["x", "h0", "weights", "one-weight"])
def test_gradients_of_any_subset_of_inputs(wants, backend):
    """The autograd formula asks the backward op only for what is needed, frozen weights included,
    eager and compiled: the gradients that exist match nn.RNN's."""
    ours = fused_birnn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64, backend=backend)
    ref = torch.nn.RNN(3, 4, 2, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    x, h0 = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(4, 2, 4, dtype=torch.float64)
    for model in (ours, ref):
        for name, p in model.named_parameters():
            p.requires_grad_(wants == "weights" or (wants == "one-weight" and name == "weight_hh_l1"))
    torch._dynamo.reset()
    for run in (ours, torch.compile(ours, fullgraph=True, backend="aot_eager")):
        grads = []
        for model in (run, ref):
            inputs = [x.clone().requires_grad_(wants == "x"), h0.clone().requires_grad_(wants == "h0")]
            out, h_n = model(*inputs)
            leaves = [t for t in inputs + list(ref.parameters() if model is ref else ours.parameters())
                      if t.requires_grad]
            grads.append(torch.autograd.grad((out * out).sum() + h_n.sum(), leaves))
        for a, b in zip(*grads, strict=True):
            assert_close(a, b, torch.float64, wants)


MODELS = {  # (constructor kwargs, call: model -> inputs)
    "seed": (dict(input_size=25, hidden_size=50, num_layers=4, batch_first=True, bidirectional=True),
             lambda: (torch.randn(15, 5, 25), torch.randn(8, 15, 50))),
    "lengths": (dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True),
                lambda: (torch.randn(6, 3, 3), None, torch.tensor([6, 2, 4]))),
    "unbatched-relu-uni": (dict(input_size=3, hidden_size=4, num_layers=2, nonlinearity="relu"),
                           lambda: (torch.randn(6, 3),)),
    "no-bias-dropout": (dict(input_size=3, hidden_size=4, num_layers=3, bias=False, dropout=0.3, bidirectional=True),
                        lambda: (torch.randn(6, 2, 3),)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_reports_no_graph_break(name):
    kwargs, inputs = MODELS[name]
    m = fused_birnn.RNN(**kwargs)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explained = torch._dynamo.explain(m)(*inputs())
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def step_of(model):
    """One step of `model` (eager or compiled): the loss and the outputs."""
    def step(x, h0, lengths):
        out, h_n = model(x, h0, lengths)
        return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + (h_n * h_n).sum(), out, h_n
    return step


def run_step(step, model, x, h0, lengths):
    """The loss, outputs and every gradient of one step."""
    model.zero_grad()
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    loss, out, h_n = step(x, h0, lengths)
    loss.backward()
    return [loss, out, h_n, x.grad, h0.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_compiled_forward_and_backward_match_eager(with_lengths, backend):
    """fullgraph=True through AOTAutograd: the forward graph calls rnn_layer, the backward graph
    rnn_layer_backward (register_autograd), and both give eager's numbers."""
    torch._dynamo.reset()
    model = fused_birnn.RNN(3, 5, 2, batch_first=True, bidirectional=True, dtype=torch.float64, backend=backend)
    compiled = torch.compile(step_of(model), fullgraph=True, backend="aot_eager")
    x, h0 = torch.randn(3, 6, 3, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4]) if with_lengths else None
    for got, want in zip(run_step(compiled, model, x, h0, lengths), run_step(step_of(model), model, x, h0, lengths),
                         strict=True):
        assert_close(got, want, torch.float64, "compiled vs eager")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # Inductor's own
def test_default_compile_with_inductor():
    """`torch.compile(model)` as users call it (Inductor), forward and backward: matches eager."""
    torch._dynamo.reset()
    model = fused_birnn.RNN(3, 5, 2, bidirectional=True)
    compiled = step_of(torch.compile(model, fullgraph=True))
    x, h0 = torch.randn(6, 2, 3), torch.randn(4, 2, 5)
    for got, want in zip(run_step(compiled, model, x, h0, None), run_step(step_of(model), model, x, h0, None),
                         strict=True):
        assert_close(got, want, torch.float32, "inductor vs eager")


def test_lengths_out_of_range_are_clamped_under_compile():
    """Values cannot be checked while tracing: eager raises, compiled clamps them into [1, T]."""
    torch._dynamo.reset()
    model = fused_birnn.RNN(3, 4, 1, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        model(x, None, torch.tensor([7, 0]))
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x, None, torch.tensor([7, 0]))
    for a, b in zip(got, model(x, None, torch.tensor([5, 1])), strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "cudagraphs"])
def test_compile_on_cuda(mode):
    """The kernels inside compiled graphs on a GPU; 'reduce-overhead' also records them in CUDA graphs
    (replayed from the third call on)."""
    torch._dynamo.reset()
    model = fused_birnn.RNN(16, 32, 2, bidirectional=True, device="cuda", backend="triton")
    compiled = step_of(torch.compile(model, fullgraph=True, mode=mode))
    x, h0 = torch.randn(9, 6, 16, device="cuda"), torch.randn(4, 6, 32, device="cuda")
    want = run_step(step_of(model), model, x, h0, None)
    for _ in range(3):
        got = run_step(compiled, model, x, h0, None)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32, f"compiled ({mode}) vs eager")
