"""On a GPU: `backend='auto'`'s measured choice (`fused_birnn.tune`) on a real device: cuDNN against our kernel
plans, timed with CUDA events, with nn's results; the parity guard against cuDNN with a deliberately wrong
plan; cuDNN never chosen where it cannot serve the call (a backward in eval(), deterministic algorithms);
the decision file read by a second process; a training step captured in a CUDA graph after tuning.

Run with `TRITON_INTERPRET=0 pytest -m cuda tests` (bench/gpu_run.sh does). Measuring is switched on here
(the suite's conftest turns it off), decisions go to a temporary folder."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_no_worse_than_cudnn

import fused_birnn
import fused_birnn.rnn as rnn_module
from fused_birnn import tune
from fused_birnn.kernels import forward as kernel_forward

pytestmark = pytest.mark.cuda


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    monkeypatch.setenv(tune.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_BIRNN_SPLIT", raising=False)
    tune.clear()
    yield tmp_path
    tune.clear()


def lstm_pair(dtype=torch.float16, I=60, H=128, L=2):
    ours = fused_birnn.LSTM(I, H, L, bidirectional=True, device="cuda", dtype=dtype)
    cudnn = torch.nn.LSTM(I, H, L, bidirectional=True, device="cuda", dtype=dtype)
    ref64 = torch.nn.LSTM(I, H, L, bidirectional=True, device="cuda", dtype=torch.float64)
    cudnn.load_state_dict(ours.state_dict())
    ref64.load_state_dict(ours.state_dict())
    return ours, cudnn, ref64


def outputs_and_grads(model, x, upstream):
    x = x.detach().to(next(model.parameters()).dtype).requires_grad_()
    out, (h_n, c_n) = model(x)
    loss = sum((o.double() * u).sum() for o, u in zip((out, h_n, c_n), upstream))
    return [out, h_n, c_n] + list(torch.autograd.grad(loss, [x, *model.parameters()]))


def vf_calls(monkeypatch):
    """Calls into ATen's RNN functions (cuDNN) from fused_birnn.rnn, by name."""
    import types

    calls, real = [], rnn_module._VF
    monkeypatch.setattr(rnn_module, "_VF", types.SimpleNamespace(**{
        name: (lambda *a, name=name: calls.append(name) or getattr(real, name)(*a))
        for name in rnn_module._ATEN.values()}))
    return calls


def test_choice_on_a_real_device(tuning):
    """A pyannote-like LSTM in fp16, training: cuDNN and our plans timed on the probe, the fastest runs,
    outputs and gradients no worse than cuDNN's against float64; estimates shown beside our plans."""
    ours, cudnn, ref64 = lstm_pair()
    x = torch.randn(100, 32, 60, device="cuda")
    upstream = [torch.randn(100, 32, 256, device="cuda", dtype=torch.float64),
                torch.randn(4, 32, 128, device="cuda", dtype=torch.float64),
                torch.randn(4, 32, 128, device="cuda", dtype=torch.float64)]
    mine = outputs_and_grads(ours, x, upstream)
    (d,) = tune.decisions(include_disk=False)
    assert d["key"]["grad"] and d["key"]["dtype"] == "float16" and d["probe"] == {"steps": 64, "batch": 32}
    assert "aten" in d["times_ms"] and "triton" in d["times_ms"], d
    assert all(t > 0 for t in d["times_ms"].values()) and d["rejected"] == {}, d
    assert d["ranking"][0] in (min(d["times_ms"], key=d["times_ms"].get), "triton")  # the default within the margin
    assert set(d["estimates_ms"]) == {n for n in d["times_ms"] if n.startswith("triton")}
    print(tune.format_decisions())  # the first real GPU figures: measured beside the cost model's estimates
    assert_no_worse_than_cudnn(outputs_and_grads(ref64, x, upstream), outputs_and_grads(cudnn, x, upstream), mine,
                               torch.float16)


def test_parity_guard_against_cudnn(tuning, monkeypatch, no_tf32):
    """Our kernels made wrong on purpose (the forward recurrence's output scaled by 1.1): the guard finds
    it on the probe against cuDNN, warns once naming the shape and the plan, and the shape runs cuDNN."""
    real = kernel_forward.recurrence_forward

    def wrong(*args, **kwargs):
        out, *rest = real(*args, **kwargs)
        return (out * 1.1, *rest)

    monkeypatch.setattr(kernel_forward, "recurrence_forward", wrong)
    ours, cudnn, _ = lstm_pair(torch.float32)
    calls = vf_calls(monkeypatch)
    x = torch.randn(20, 8, 60, device="cuda")
    with pytest.warns(RuntimeWarning, match=r"will not run triton for LSTM L2 I60 H128 .*scaled error") as record:
        with torch.no_grad():
            for _ in range(2):
                out, _ = ours(x)
    assert sum("will not run triton " in str(w.message) for w in record) == 1
    (d,) = tune.decisions(include_disk=False)
    assert d["ranking"][0] == "aten" and all(not n.startswith("triton") for n in d["ranking"])
    calls.clear()
    with torch.no_grad():
        out, _ = ours(x)
        torch.testing.assert_close(out, cudnn(x)[0])
    assert calls == ["lstm"]


@pytest.mark.parametrize("rule", ["eval_backward", "deterministic"])
def test_cudnn_is_not_chosen_where_it_cannot_serve(tuning, monkeypatch, rule, no_tf32):
    """cuDNN timed fastest (an injected timer), then a call it cannot serve: our kernels serve it, with
    cuDNN's results in training mode; deterministic calls repeat bitwise."""
    monkeypatch.setattr(tune, "timer", lambda fns, device: {n: 1.0 if n == "aten" else 2.0 for n in fns})
    ours, cudnn, _ = lstm_pair(torch.float32)
    calls = vf_calls(monkeypatch)
    x = torch.randn(12, 4, 60, device="cuda", requires_grad=True)
    ours(x)[0].sum().backward()  # training mode: decided, cuDNN runs
    assert calls and calls[-1] == "lstm"
    calls.clear()
    if rule == "eval_backward":
        ours.eval()
        out = ours(x)[0]
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        out = ours(x)[0]
        assert torch.equal(out, ours(x)[0])
    grads = torch.autograd.grad(out.sum(), [x, *ours.parameters()])
    assert calls == [], "cuDNN served a call it cannot"
    ref_out = cudnn(x)[0]
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    for g, want in zip(grads, torch.autograd.grad(ref_out.sum(), [x, *cudnn.parameters()]), strict=True):
        torch.testing.assert_close(g, want, atol=2e-3, rtol=2e-3)


def test_decisions_carry_over_to_a_second_process(tuning):
    """One process measures and writes the decision file; a second, whose timer would fail, reads it and
    runs the same choice."""
    script = textwrap.dedent("""
        import json, sys, torch, fused_birnn
        from fused_birnn import tune
        if sys.argv[1] == "second":
            def refuse(fns, device):
                raise AssertionError("measured again")
            tune.timer = refuse
        torch.manual_seed(0)
        gru = fused_birnn.GRU(64, 256, 2, bidirectional=True, device="cuda", dtype=torch.float16)
        x = torch.randn(50, 16, 64, device="cuda", dtype=torch.float16, requires_grad=True)
        gru(x)[0].sum().backward()
        torch.cuda.synchronize()
        (d,) = tune.decisions(include_disk=False)
        print(json.dumps({"runs": d["ranking"][0], "source": d["source"]}))
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", **{tune.AUTOTUNE_ENV: "1", tune.CACHE_ENV: str(tuning / "two")})
    results = []
    for which in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", script, which], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0]["source"] == "measured" and results[1]["source"] == "disk"
    assert results[0]["runs"] == results[1]["runs"]


def test_cuda_graph_captures_a_training_step_after_tuning(tuning, no_tf32):
    """Tuned during the warm-up (eager, off the capture), then forward, backward and an SGD step captured
    in one CUDA graph, whichever candidate won, and replayed: the same losses and weights as an eager twin;
    nothing is measured while capturing."""
    model = fused_birnn.LSTM(16, 32, 2, bidirectional=True, device="cuda")
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    x = torch.randn(9, 6, 16, device="cuda")
    h0, c0 = torch.randn(4, 6, 32, device="cuda"), torch.randn(4, 6, 32, device="cuda")
    data = [tuple(torch.randn_like(t) for t in (x, h0, c0)) for _ in range(3)]

    def step(m, o, x, h0, c0):
        o.zero_grad(set_to_none=True)
        out, (h_n, c_n) = m(x, (h0, c0))
        loss = out.square().mean() + h_n.mean() + c_n.mean()
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the key measured, kernels compiled, optimizer state made
        for _ in range(2):
            step(model, opt, x, h0, c0)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(twin, twin_opt, x, h0, c0)
    decided = tune.decisions(include_disk=False)
    assert len(decided) == 1 and decided[0]["key"]["grad"]

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, x, h0, c0)  # recorded, not run
    assert len(tune.decisions(include_disk=False)) == 1
    for new in data:
        for t, v in zip((x, h0, c0), new):
            t.copy_(v)
        graph.replay()
        twin_loss = step(twin, twin_opt, *new)
        torch.testing.assert_close(static_loss, twin_loss)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q)
