"""`backend='auto'`'s measured choice (`fused_birnn.tune`) on a CPU: the ranking from injected timings, every
capability rule (described for a CUDA device: no GPU needed), the parity guard against a deliberately
wrong candidate, the decision files (round trip, corrupt, foreign, another version, a missing or unwritable
folder), nothing timed while torch.compile or torch.jit traces or a CUDA graph is captured, and
`FUSED_BIRNN_AUTOTUNE=0` as before. The suite's conftest turns measuring off; these tests turn it on, with
the interpreter's view switched off (`aten_calls`) as `auto` decides in a user's process."""

import json
import warnings

import pytest
import torch
from conftest import assert_close

import fused_birnn
import fused_birnn.functional as functional
import fused_birnn.rnn as rnn_module
import fused_birnn.torch_backend as torch_backend
from fused_birnn import tune
from fused_birnn.tune import Decision, Key


@pytest.fixture
def tuning(monkeypatch, tmp_path, aten_calls):
    """Measuring on, decisions in a fresh folder, nothing remembered from other tests; a timer that
    records what it was asked to time and answers from `times` (ms per candidate; unset: the real one)."""
    monkeypatch.setenv(tune.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path / "cache"))
    tune.clear()
    asked = []

    class Timer:
        times: dict | None = None

        def __call__(self, fns, device):
            asked.append(sorted(fns))
            if self.times is None:
                return tune.measure_ms(fns, device)
            return {n: self.times[n] for n in fns}

    timer = Timer()
    monkeypatch.setattr(tune, "timer", timer)
    yield timer, asked, aten_calls
    tune.clear()


def pair(cell="RNN", layers=2, **kwargs):
    ours = getattr(fused_birnn, cell)(3, 4, layers, bidirectional=True, **kwargs)
    ref = getattr(torch.nn, cell)(3, 4, layers, bidirectional=True, **{k: v for k, v in kwargs.items()
                                                                        if k != "backend"})
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def layers_run(monkeypatch):
    """How many of our layers ran (`birnn_layer` calls from the module)."""
    calls = []
    real = rnn_module.birnn_layer
    monkeypatch.setattr(rnn_module, "birnn_layer", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


# ------------------------------------------------------------------------- the ranking, on a fake device

def key(device="NVIDIA Fake GPU", grad=True, **kw):
    fields = dict(cell="LSTM", input_size=3, hidden_size=4, proj_size=0, num_layers=1, directions=2, bias=True,
                  device=device, dtype=torch.float32, autocast=None, tf32=False, grad=grad, rows="", batch=2,
                  steps=4, threads=0)
    return Key(**{**fields, **kw})


class FakeProbe(tune.Probe):
    """Candidates' outputs on a made-up probe: nn's kernel returns the truth rounded as a float32 kernel
    might; "triton:bad" is off by 1%; names in `raising` raise."""

    steps, batch = 4, 2

    def __init__(self, raising=()):
        gen = torch.Generator().manual_seed(1)
        self.exact = [torch.randn(4, 2, 8, generator=gen, dtype=torch.float64), torch.randn(2, 2, 4, generator=gen,
                                                                                             dtype=torch.float64)]
        self.raising, self.ran = set(raising), []

    def run(self, name):
        self.ran.append(name)
        if name in self.raising:
            raise RuntimeError(f"{name} cannot run this")
        out = [t.float() for t in self.exact]
        return [out[0] * 1.01, out[1]] if name == "triton:bad" else out

    def truth(self):
        return self.exact

    def tolerance(self):
        return 1e-5


def decide(timer, names, default="triton", probe=None, **key_fields):
    timer.times = {"aten": 1.0, "triton": 0.8, "triton:split=2": 0.7, "triton:bad": 0.1, "torch": 5.0}
    probe = probe or FakeProbe()
    return tune.decide(key(**key_fields), torch.device("cpu"), names, default, probe), probe


def test_fastest_agreeing_candidate_wins_and_the_default_within_the_margin(tuning):
    timer, asked, _ = tuning
    d, probe = decide(timer, ["aten", "triton", "triton:split=2"])
    assert d.ranking == ["triton:split=2", "triton", "aten"] and d.choice == "triton:split=2"
    assert probe.ran[:3] == ["aten", "triton", "triton:split=2"] and asked == [["aten", "triton", "triton:split=2"]]
    timer_times = {"aten": 1.0, "triton": 0.8 * (1 + tune.MARGIN * 0.9)}  # the default, within the margin
    timer.times = {**timer.times, **timer_times, "triton:split=2": 0.8}
    d = tune.decide(key(), torch.device("cpu"), ["aten", "triton", "triton:split=2"], "triton", FakeProbe())
    assert d.choice == "triton", "the default is kept within the margin of the fastest"
    timer.times["triton"] = 0.8 * (1 + tune.MARGIN * 1.5)
    d = tune.decide(key(), torch.device("cpu"), ["aten", "triton", "triton:split=2"], "triton", FakeProbe())
    assert d.choice == "triton:split=2"


def test_leaving_the_default_takes_a_win_in_three_rounds_of_four():
    """Per-round times (ms) of the same rounds: a challenger ahead by 10% in every round but one leaves the
    default; one that wins on the median only through a few lucky rounds does not."""
    default = [10.0] * 8
    assert tune.clearly_faster([9.0] * 7 + [11.0], default)
    assert not tune.clearly_faster([8.0, 8.0, 8.0, 8.0, 10.2, 10.2, 10.5, 11.0], default)  # median 9.1: a tie
    assert not tune.clearly_faster([9.8] * 8, default)  # 2% faster: within the margin
    assert tune.clearly_faster([0.5], [1.0]) and not tune.clearly_faster([], [])


def test_a_candidate_that_raises_is_never_chosen(tuning):
    timer, _, _ = tuning
    with pytest.warns(RuntimeWarning, match=r"will not run triton:split=2 .*raised RuntimeError"):
        d, _ = decide(timer, ["aten", "triton", "triton:split=2"], probe=FakeProbe(raising={"triton:split=2"}))
    assert d.ranking == ["triton", "aten"] and "triton:split=2" in d.rejected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn's kernel unsupported (e.g. cuDNN without bf16): no warning, ours
        d, _ = decide(timer, ["aten", "triton"], probe=FakeProbe(raising={"aten"}))  # checked against float64
    assert d.ranking == ["triton"] and d.rejected["aten"].startswith("raised")


def test_parity_guard_rejects_a_wrong_plan_and_warns_once(tuning):
    timer, asked, _ = tuning
    with pytest.warns(RuntimeWarning) as record:
        d, _ = decide(timer, ["aten", "triton:bad"], default="triton:bad")
        d2, _ = decide(timer, ["aten", "triton:bad"], default="triton:bad")
    msgs = [str(w.message) for w in record if "triton:bad" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "LSTM L1 I3 H4" in msgs[0] and "scaled error" in msgs[0] and "runs aten instead" in msgs[0]
    assert d.ranking == d2.ranking == ["aten"] and "disagrees" in d.rejected["triton:bad"]
    assert asked == [], "a plan that disagrees is not timed (nn's kernel is left alone: nothing to time)"


@pytest.mark.parametrize("rule", ["long", "eval_backward", "deterministic", "capture_lengths"])
def test_cudnn_capability_rules(rule):
    """Per call on CUDA: T >= 65,536, a backward in eval(), deterministic algorithms, lengths under capture
    each rule nn's kernel (cuDNN) out; the ranking's next candidate serves, our PyTorch path if none is
    left. ATen's CPU kernels serve all of these."""
    call = dict(training=True, steps=100, needs_grad=True, lengths=False, deterministic=False, capturing=False)
    assert tune.aten_refusal("cuda", **call) is None
    bad = {"long": dict(steps=65536), "eval_backward": dict(training=False),
           "deterministic": dict(deterministic=True), "capture_lengths": dict(capturing=True, lengths=True)}[rule]
    why = tune.aten_refusal("cuda", **{**call, **bad})
    assert why and tune.aten_refusal("cpu", **{**call, **bad}) is None
    d = Decision(key(), ["aten", "triton"], {"aten": 1.0, "triton": 2.0})
    assert tune.pick(d, None) == "aten" and tune.pick(d, why) == "triton"
    assert tune.pick(Decision(key(), ["aten"], {"aten": 1.0}), why) == "torch"
    assert tune.aten_refusal("cuda", **{**call, "steps": 65535}) is None
    assert tune.aten_refusal("cuda", **{**call, "training": False, "needs_grad": False}) is None  # eval inference
    assert tune.aten_refusal("cuda", **{**call, "capturing": True}) is None  # capture without lengths


def test_kernel_plans_for_a_gpu_are_the_planners_and_other_splits(monkeypatch):
    from fused_birnn.kernels import config as kc

    monkeypatch.setattr(kc, "device_limits", lambda device: kc.DeviceLimits.for_arch(90))
    monkeypatch.delenv("FUSED_BIRNN_SPLIT", raising=False)
    k = key(cell="LSTM", hidden_size=1024, batch=32, dtype=torch.float16, input_size=1024)
    names = tune.kernel_plans(k, torch.device("cuda"))
    assert names[0] == "triton" and 1 < len(names) <= 1 + tune.MAX_ALTERNATIVES, names
    planner = kc.select_config(1024, 32, torch.float16, False, kc.DeviceLimits.for_arch(90), None, "LSTM", None)
    for name in names[1:]:
        S = functional.plan_split(name)
        assert S != planner.programs_per_group(1024)
        cfg = kc.select_config(1024, 32, torch.float16, False, kc.DeviceLimits.for_arch(90), S, "LSTM", None)
        assert cfg.programs_per_group(1024) == S
        assert tune.estimate_ms(name, k, torch.device("cuda"), 64) > 0  # an estimate, for --show
    assert tune.kernel_plans(key(dtype=torch.float64), torch.device("cuda")) == []  # our PyTorch path then
    monkeypatch.setenv("FUSED_BIRNN_SPLIT", "4")
    assert tune.kernel_plans(k, torch.device("cuda")) == ["triton"]  # the user's split


@pytest.mark.skipif(not functional.INTERPRETER, reason="needs TRITON_INTERPRET=1")
def test_a_tuned_split_reaches_the_kernels_forward_and_backward(monkeypatch):
    """backend 'triton:split=S' (what a decision names): both launches get a plan with S programs."""
    from fused_birnn.kernels import backward as kb
    from fused_birnn.kernels import forward as kf

    monkeypatch.delenv("FUSED_BIRNN_SPLIT", raising=False)
    seen = []
    for mod, name in ((kf, "recurrence_forward"), (kb, "recurrence_backward")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, **kw: seen.append(kw["config"]) or real(*a, **kw))
    ours, ref = pair("GRU", layers=1, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = ours._run_layers(x, (torch.zeros(2, 2, 4, dtype=torch.float64),), None, ours._weights(), "triton:split=2")
    out.sum().backward()
    assert [c.programs_per_group(4) for c in seen] == [2, 2]
    assert_close(out, ref(x)[0], torch.float64, "split 2")
    assert functional.resolve_backend("triton:split=2", x.device, torch.float64) == "triton:split=2"
    for bad in ("triton:split=0", "triton:split=x"):
        with pytest.raises(ValueError, match="positive integer"):
            functional.resolve_backend(bad, x.device, torch.float64)


# ---------------------------------------------------------------------- the module, measured, on a CPU

@pytest.mark.parametrize("faster", ["torch", "aten"])
def test_module_runs_the_faster_candidate_with_nns_results(tuning, monkeypatch, faster):
    timer, asked, aten_calls = tuning
    timer.times = {"aten": 2.0, "torch": 1.0} if faster == "torch" else {"aten": 1.0, "torch": 2.0}
    layers = layers_run(monkeypatch)
    ours, ref = pair()
    x = torch.randn(5, 2, 3, requires_grad=True)
    rng = torch.get_rng_state()
    out, h_n = ours(x)
    assert torch.equal(rng, torch.get_rng_state()), "the probe drew from the user's random stream"
    assert asked == [["aten", "torch"]] and all(p.grad is None for p in ours.parameters())
    aten_calls.clear()
    layers.clear()
    out, h_n = ours(x)  # the decision is kept: nothing measured again
    (out.sum() + h_n.sum()).backward()
    assert asked == [["aten", "torch"]]
    assert (aten_calls == ["rnn_tanh"]) == (faster == "aten") and bool(layers) == (faster == "torch")
    grads = [x.grad] + [p.grad for p in ours.parameters()]
    x.grad = None
    ref_out, ref_h_n = ref(x)
    (ref_out.sum() + ref_h_n.sum()).backward()
    torch.testing.assert_close(out, ref_out)
    for g, want in zip(grads, [x.grad] + [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(g, want)  # the probe left nothing in .grad
    (d,) = tune.decisions(include_disk=False)
    assert d["ranking"][0] == faster and d["key"]["grad"] and d["probe"] == {"steps": 4, "batch": 2}


@pytest.mark.parametrize("faster", ["torch", "aten"])
def test_packed_and_lengths_calls_are_shapes_of_their_own(tuning, monkeypatch, faster):
    """A PackedSequence and `lengths=` are measured as such (the probe runs them as the call does: ATen's
    packed kernel, or padded through our layers), each with nn's packed results and gradients."""
    timer, asked, aten_calls = tuning
    timer.times = {"aten": 2.0, "torch": 1.0} if faster == "torch" else {"aten": 1.0, "torch": 2.0}
    layers = layers_run(monkeypatch)
    ours, ref = pair("LSTM")
    x = torch.randn(6, 3, 3, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    def packed():
        return torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)

    ours(packed())  # decided (the probe runs both)
    ours(x, lengths=lengths)
    layers.clear()
    results = []
    for model in (ours, ref):
        out, (h_n, c_n) = model(packed())
        grads = torch.autograd.grad(out.data.sum() + h_n.sum() + c_n.sum(), [x, *model.parameters()])
        results.append([out.data, h_n, c_n, *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
    out = ours(x, lengths=lengths)[0]
    want = torch.nn.utils.rnn.pad_packed_sequence(ref(packed())[0], total_length=6)[0]
    torch.testing.assert_close(out, want)
    assert sorted(d["key"]["rows"] for d in tune.decisions(include_disk=False)) == ["lengths", "packed"]
    assert all(d["ranking"][0] == faster for d in tune.decisions(include_disk=False))
    assert bool(layers) == (faster == "torch")


def test_default_stays_unless_clearly_slower(tuning):
    """The CPU default for Elman inference is ATen's kernel: our path 2% faster (within the margin) does not
    replace it; LSTM training (default ATen) against our path 10% faster does."""
    timer, _, aten_calls = tuning
    ours, _ = pair()
    timer.times = {"aten": 1.0, "torch": 1.0 / (1 + tune.MARGIN * 0.7)}
    with torch.no_grad():
        ours(torch.randn(5, 2, 3))
    timer.times = {"aten": 1.0, "torch": 0.9}
    lstm, _ = pair("LSTM")
    lstm(torch.randn(5, 2, 3, requires_grad=True))
    assert [d["ranking"][0] for d in tune.decisions(include_disk=False)] == ["aten", "torch"]


def test_parity_guard_in_the_module_falls_back_to_nns_kernel_and_warns_once(tuning, monkeypatch):
    """Our path made wrong on purpose (its recurrence's output scaled by 1.01) and timed fastest: the guard
    finds it on the probe, the shape runs nn's kernel with nn's results, one warning names the shape, the
    candidate and the error."""
    timer, _, aten_calls = tuning
    timer.times = {"aten": 2.0, "torch": 1.0}
    real = torch_backend.recurrence_forward

    def corrupted(*args, **kwargs):
        out, *rest = real(*args, **kwargs)
        return (out * 1.01, *rest)

    monkeypatch.setattr(torch_backend, "recurrence_forward", corrupted)
    ours, ref = pair()
    x = torch.randn(6, 2, 3)
    with pytest.warns(RuntimeWarning) as record:
        with torch.no_grad():
            for _ in range(3):
                out, h_n = ours(x)
    msgs = [str(w.message) for w in record if "fused_birnn" in str(w.message)]
    assert len(msgs) == 1 and "will not run torch for RNN L2 I3 H4" in msgs[0] and "scaled error" in msgs[0], msgs
    assert "runs aten instead" in msgs[0]
    assert aten_calls[-1] == "rnn_tanh"
    ref_out, ref_h_n = ref(x)
    assert torch.equal(out, ref_out) and torch.equal(h_n, ref_h_n)
    (d,) = tune.decisions(include_disk=False)
    assert d["ranking"] == ["aten"] and "disagrees" in d["rejected"]["torch"]


def test_a_real_measurement_on_a_cpu(tuning):
    """The real timer (no injection), a tiny shape: both candidates timed, positive medians, nn's results."""
    timer, _, _ = tuning
    ours, ref = pair("GRU", layers=1)
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        out, _ = ours(x)
    torch.testing.assert_close(out, ref(x)[0])
    (d,) = tune.decisions(include_disk=False)
    assert set(d["times_ms"]) == {"aten", "torch"} and all(t > 0 for t in d["times_ms"].values())
    assert d["cost_s"] < 5 and d["ranking"][0] in ("aten", "torch")


def test_pinned_backends_measure_nothing(tuning):
    timer, asked, aten_calls = tuning
    for backend in ("torch",) + (("triton",) if functional.INTERPRETER else ()):
        ours, ref = pair(backend=backend)
        x = torch.randn(3, 2, 3)
        with torch.no_grad():
            torch.testing.assert_close(ours(x)[0], ref(x)[0])
    assert asked == [] and aten_calls == []


# ------------------------------------------------------------------------------------- not measured

def refusing_timer(fns, device):
    raise AssertionError(f"timed {sorted(fns)}")


def test_autotune_0_runs_the_default_as_before(tuning, monkeypatch):
    """FUSED_BIRNN_AUTOTUNE=0: the fixed rule of earlier versions (ATen for inference, LSTM and GRU, and
    Elman training under 32 steps; our path for longer Elman training), nothing measured or kept."""
    monkeypatch.setenv(tune.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(tune, "timer", refusing_timer)
    _, _, aten_calls = tuning
    layers = layers_run(monkeypatch)
    ours, _ = pair()
    lstm, _ = pair("LSTM")
    short = tune.ATEN_MAX_TRAINING_STEPS
    runs = [(ours, 40, False), (ours, short - 1, True), (ours, short, True), (lstm, 40, True)]
    for model, T, grad in runs:
        aten_calls.clear()
        layers.clear()
        with torch.set_grad_enabled(grad):
            model(torch.randn(T, 2, 3, requires_grad=grad))
        aten = bool(aten_calls)
        assert aten == (model is lstm or not grad or T < tune.ATEN_MAX_TRAINING_STEPS) and aten != bool(layers), T
    assert tune.decisions(include_disk=False) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_nothing_is_timed_while_compiling_tracing_or_capturing(tuning, monkeypatch):
    monkeypatch.setattr(tune, "timer", refusing_timer)
    ours, ref = pair()
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], ref(x)[0])
        traced = torch.jit.trace(ours, (x,), check_trace=False)
        torch.testing.assert_close(traced(x)[0], ref(x)[0])
    assert tune.decisions(include_disk=False) == []
    capturing = [False]  # a CUDA device described: its current stream capturing or not
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert not tune.paused(torch.device("cpu")) and not tune.paused(torch.device("cuda"))
    capturing[0] = True
    assert tune.paused(torch.device("cuda")) and not tune.paused(torch.device("cpu"))


# --------------------------------------------------------------------------------------- the files

def decided_on_disk(timer):
    """A training call whose measured decision (ours 2x faster) is now in this environment's file."""
    timer.times = {"aten": 2.0, "torch": 1.0}
    ours, _ = pair()
    x = torch.randn(5, 2, 3, requires_grad=True)
    ours(x)
    return ours, x, tune.cache_file("cpu")


def test_decisions_survive_a_new_process_and_a_corrupt_file_is_ignored(tuning, monkeypatch):
    timer, asked, _ = tuning
    ours, x, path = decided_on_disk(timer)
    saved = json.loads(path.read_text())
    assert saved["schema"] == tune.SCHEMA and saved["fingerprint"] == tune.fingerprint("cpu")
    assert len(saved["decisions"]) == 1 and saved["decisions"][0]["ranking"] == ["torch", "aten"]
    tune.clear()  # as a new process: memory empty, the file read at the next unseen key
    monkeypatch.setattr(tune, "timer", refusing_timer)
    layers = layers_run(monkeypatch)
    ours(x)
    assert layers, "the decision read back runs our path"
    (d,) = tune.decisions(include_disk=False)
    assert d["source"] == "disk" and d["times_ms"] == {"aten": 2.0, "torch": 1.0}
    assert "runs torch" in tune.format_decisions() and "2.00x nn's kernel" in tune.format_decisions()
    for bad in ("{not json", json.dumps({**saved, "schema": 99}), json.dumps({**saved, "decisions": [{"key": {}}]})):
        path.write_text(bad)
        tune.clear()
        monkeypatch.setattr(tune, "timer", timer)
        with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
            ours(x)  # measured again, the file rewritten whole
        assert json.loads(path.read_text())["decisions"][0]["ranking"] == ["torch", "aten"]


def test_foreign_or_other_version_files_are_not_used(tuning, monkeypatch):
    timer, asked, _ = tuning
    ours, x, path = decided_on_disk(timer)
    real = tune.fingerprint
    monkeypatch.setattr(tune, "fingerprint", lambda kind: {**real(kind), "torch": "9.9.9"})  # an upgrade
    assert tune.cache_file("cpu") != path
    tune.clear()
    ours(x)
    assert len(asked) == 2, "another version's decisions are not read"
    other = tune.cache_file("cpu")
    other.write_text(path.read_text())  # a file of the old versions under the new name: foreign
    tune.clear()
    with pytest.warns(RuntimeWarning, match="not this environment"):
        ours(x)
    assert len(asked) == 3


def test_cache_folder_missing_unwritable_or_off(tuning, monkeypatch, tmp_path):
    timer, asked, _ = tuning
    timer.times = {"aten": 1.0, "torch": 2.0}
    deep = tmp_path / "not" / "yet"
    monkeypatch.setenv(tune.CACHE_ENV, str(deep))
    ours, _ = pair()
    with torch.no_grad():
        ours(torch.randn(5, 2, 3))
    assert tune.cache_file("cpu").parent == deep and tune.cache_file("cpu").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(tune.CACHE_ENV, str(blocker / "below"))
    tune.clear()
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        with torch.no_grad():
            ours(torch.randn(5, 2, 3))
            ours(torch.randn(5, 3, 3))  # another key (batch 3): no second warning
    assert len(tune.decisions(include_disk=False)) == 2
    monkeypatch.setenv(tune.CACHE_ENV, "0")
    assert tune.cache_dir() is None and tune.cache_file("cpu") is None
    monkeypatch.delenv(tune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune.cache_dir() == tmp_path / "xdg" / "fused_birnn"


def test_show_prints_the_decisions_with_estimates(tuning, capsys):
    timer, _, _ = tuning
    timer.times = {"aten": 1.0, "torch": 2.0}
    ours, _ = pair()
    with torch.no_grad():
        ours(torch.randn(5, 2, 3))
    assert tune.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert "decision files: cpu:" in out and "RNN L2 I3 H4 bi B2 T4-7 float32 infer (cpu" in out and "runs aten" in out
    assert "0.50x nn's kernel" in out
    gpu = Decision(key(), ["triton", "aten"], {"triton": 0.5, "aten": 1.0}, {"triton": 0.25}, probe={"steps": 4})
    text = tune.format_decisions([{**gpu.to_json(), "source": "measured", "key_text": gpu.key.describe(),
                                   "ratios": {"triton": 2.0, "aten": 1.0}}])
    assert "est. 0.250 ms" in text and "measured 125.00 us, estimated 62.50 us per layer-step" in text
    assert tune.main(["--clear"]) == 0 and not tune.cache_file("cpu").exists()
