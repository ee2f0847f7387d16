"""The benchmark command (`python -m fused_birnn.bench`) on CPU at tiny sizes: it writes well-formed JSON,
markdown and PNG files, and a wrong candidate is reported as a parity failure instead of being timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_birnn
from fused_birnn.bench import Config, Options, get_suite, run_suite, scaled_error
from fused_birnn.bench.parity import wrap_packed
from fused_birnn.bench.suites import ALL, LSTM_GRU_SUITES, RNN_SUITES, SUITES
from fused_birnn.functional import INTERPRETER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAMPS = ("torch", "triton", "cuda", "cudnn", "driver", "date", "cpu_model", "gpu_name")
QUIET = dict(device="cpu", quick=True, compile=False, progress=False)


def _check_files(out: Path, stem: str) -> dict:
    payload = json.loads((out / f"{stem}.json").read_text())
    for key in STAMPS:
        assert key in payload["env"], key
    assert payload["env"]["torch"] == torch.__version__
    assert payload["partial"] is False
    md = (out / f"{stem}.md").read_text()
    assert "| config | parity |" in md and "\n|---|" in md
    assert payload["env"]["date"] in md and f"torch {torch.__version__}" in md
    pngs = sorted(out.glob(f"{stem}_*.png"))
    assert {p.name for p in pngs} >= {f"{stem}_speedup.png", f"{stem}_vs_T.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE, p
    return payload


def test_command_writes_json_markdown_png(tmp_path):
    """No --out: a fresh folder under the current one (never the committed bench/results/), said where."""
    env = dict(os.environ, MPLBACKEND="Agg")
    (tmp_path / "fused_birnn-results").mkdir()  # an earlier run's folder must survive untouched
    (tmp_path / "fused_birnn-results" / "tiny_quick.json").write_text("earlier")
    proc = subprocess.run(
        [sys.executable, "-m", "fused_birnn.bench", "--suite", "tiny", "--device", "cpu", "--quick",
         "--no-compile"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "fused_birnn-results").glob("cpu-*"))
    assert len(runs) == 1, runs
    out = runs[0]
    assert f"results go to {out.resolve()}" in proc.stdout
    assert (tmp_path / "fused_birnn-results" / "tiny_quick.json").read_text() == "earlier"
    assert "CPU fwd ratio [95% CI]" in proc.stdout  # the final table
    assert "ratio = nn.RNN time / ours (> 1: ours faster" in proc.stdout  # which way it reads
    assert "[tiny 1/3] L2 I3 H4 B2 T3 fp32: auto: ok, torch: ok" in proc.stderr  # one whole line per configuration
    assert "[tiny 3/3]" in proc.stderr
    assert "allow_tf32" not in proc.stdout  # meaningless on a CPU run
    payload = _check_files(out, "tiny_quick")
    assert payload["env"]["device"] == "cpu" and "allow_tf32" not in payload["env"]
    assert "allow_tf32" not in (out / "tiny_quick.md").read_text()
    flagged = []
    for r in payload["results"]:
        for mode in ("fwd", "fwd_bwd"):
            e = r[mode]
            lo, hi = e["ratio_ci95"]
            assert lo <= e["ratio"] <= hi
            assert e["converged"] == (max(e["ratio"] - lo, hi - e["ratio"]) / e["ratio"] <= 0.05 + 1e-9)
            assert e["stop"] in ("converged", "max_runs", "max_time") and 4 <= e["rounds"] <= 10
            if not e["converged"]:
                flagged.append(f"{r['label']} {'forward' if mode == 'fwd' else 'forward+backward'}")
                assert r["label"] in proc.stdout.split("did not converge")[1]
    assert payload["not_converged"] == flagged
    assert len(payload["results"]) == 3  # two padded shapes and a packed one
    assert [r["config"]["packed"] for r in payload["results"]] == [False, False, True]
    for r in payload["results"]:
        assert r["status"] == "ok", r["status_text"]
        assert r["parity"]["ours"]["backend"] == "auto"  # timed: what users get
        assert r["parity"]["ours"]["fwd_ok"] and r["parity"]["ours"]["bwd_ok"]
        assert r["parity"]["torch"]["fwd_ok"] and r["parity"]["torch"]["bwd_ok"]  # the PyTorch path, untimed
        if INTERPRETER:  # the kernels, interpreted, passed the same gate (untimed)
            assert r["parity"]["triton"]["fwd_ok"] and r["parity"]["triton"]["bwd_ok"]
        for mode in ("fwd", "fwd_bwd"):
            assert r[mode]["ours_ms"] > 0 and r[mode]["ref_ms"] > 0 and r[mode]["ratio"] > 0
            assert r["auto_runs"][mode]["runs"] in ("aten", "torch")  # what auto ran, in the table too
    assert "auto runs fwd / fwd+bwd" in proc.stdout


def _on_data(out, fn):
    """Apply `fn` to a tensor output, or to a PackedSequence's data."""
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return out._replace(data=fn(out.data))
    return fn(out)


class _Perturbed(fused_birnn.RNN):
    """Right parameters, wrong output: what the gate must catch."""

    def forward(self, input, hx=None):
        out, h_n = super().forward(input, hx)
        return _on_data(out, lambda d: d + 1e-3), h_n


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


class _WrongGradient(fused_birnn.RNN):
    """Right forward, gradients 1% off."""

    def forward(self, input, hx=None):
        out, h_n = super().forward(input, hx)
        return _on_data(out, _ScaleGrad.apply), h_n


def _factory(cls):
    def make(cfg: Config, backend: str, device):
        return wrap_packed(cls(cfg.input_size, cfg.hidden_size, cfg.num_layers, nonlinearity=cfg.nonlinearity,
                               batch_first=cfg.batch_first, bidirectional=True, device=device,
                               dtype=cfg.torch_dtype, backend="torch"), cfg)
    return make


def test_wrong_candidate_is_a_parity_failure_and_not_timed(tmp_path):
    payload = run_suite("tiny", tmp_path, Options(**QUIET, candidate_factory=_factory(_Perturbed)))
    _check_files(tmp_path, "tiny_quick")
    for r in payload["results"]:
        assert r["status"] == "parity_failure"
        assert not r["parity"]["ours"]["fwd_ok"]
        assert r["fwd"] is None and r["fwd_bwd"] is None
        assert "FAIL fwd (output" in r["status_text"]
    assert "FAIL fwd" in (tmp_path / "tiny_quick.md").read_text()


def test_wrong_gradient_times_forward_only(tmp_path):
    payload = run_suite("tiny", tmp_path, Options(**QUIET, plots=False, candidate_factory=_factory(_WrongGradient)))
    for r in payload["results"]:
        p = r["parity"]["ours"]
        assert p["fwd_ok"] and not p["bwd_ok"]
        assert not p["tensors"]["fwd+bwd"]["grad_input"]["ok"]
        assert r["status"] == "parity_failure"
        assert r["fwd"]["ours_ms"] > 0 and r["fwd_bwd"] is None


def test_interrupt_keeps_what_was_measured_and_stops(tmp_path):
    """Ctrl-C (or `timeout --signal=INT`, as bench/gpu_run.sh bounds each step) to the command's process
    group during the second suite: the first suite's files are complete, the second's say where it was
    interrupted, no further suite runs, exit status 130. Through the re-executed interpreter child too."""
    import signal

    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "fused_birnn.bench", "--suite", "seed", "tagger", "tiny", "--device", "cpu", "--quick",
         "--no-compile", "--no-plots", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:  # the first suite is done; tagger's one configuration takes seconds
            if line.startswith("wrote ") and "seed_quick.json" in line:
                break
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    seed = json.loads((tmp_path / "seed_quick.json").read_text())
    assert not seed["partial"] and len(seed["results"]) == 1 and "interrupted" not in seed
    tagger = json.loads((tmp_path / "tagger_quick.json").read_text())
    assert tagger["interrupted"] == "after 0 of 1 configurations" and not tagger["partial"]
    assert (tmp_path / "tagger_quick.md").exists() and not (tmp_path / "tiny_quick.json").exists()
    assert "tiny" not in out


def test_compile_only_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fused_birnn.bench", "--suite", "tiny", "--compile-only", "--dtype", "fp16",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "tiny_fp16_compile.json").read_text())
    assert payload["compile_error"] is None, payload["compile_error"]
    rows = payload["results"][0]["compile"]
    assert {r["target"] for r in rows} >= {"sm_80", "sm_90"}  # and whatever targets compile_report adds
    assert all(r["error"] is None and r["registers"] > 0 for r in rows)
    md = (tmp_path / "tiny_fp16_compile.md").read_text()
    assert "| config | kernel | target |" in md and "/ 132 (H100 SXM)" in md


@pytest.mark.parametrize("device", ["cuda", "cpu"], ids=["gpu_shapes", "cpu_shapes"])  # no "cuda" keyword
def test_suites_are_defined_for_both_devices(device):
    for name in SUITES:
        full, quick = get_suite(name, device), get_suite(name, device, quick=True)
        assert full and quick and len(quick) <= len(full)
    assert set(ALL) <= set(SUITES)
    seed = get_suite("seed", device, dtypes=("fp32",))[0]
    assert (seed.num_layers, seed.input_size, seed.hidden_size, seed.batch, seed.seq_len, seed.batch_first) == \
        (4, 25, 50, 15, 5, True)


def test_flops_and_metric():
    c = Config(2, 3, 4, 5, 6)
    assert c.forward_flops() == 2 * 2 * 6 * 5 * ((3 * 4 + 16) + (8 * 4 + 16))
    b = torch.tensor([1.0, -2.0])
    assert scaled_error(b, b) == 0.0
    assert scaled_error(b + 0.02, b) == pytest.approx(0.01)
    assert scaled_error(torch.tensor([float("nan"), 0.0]), b) == float("inf")


def test_cuda_report_path_with_stand_in_timers(tmp_path, monkeypatch):
    """The CUDA timing/report code on CPU tensors, with CUDA events, peak memory and the floor kernel
    replaced by stand-ins: keys, TFLOP/s, per-step figures, the markdown and the plots."""
    from fused_birnn.bench import floor, parity, report, runner

    calls = []

    def fake_time(fn, grad_to_none=None, warmup_ms=0, rep_ms=0):
        fn()
        calls.append(grad_to_none)
        return 2.0

    monkeypatch.setattr(runner, "cuda_time_ms", fake_time)
    monkeypatch.setattr(runner, "cuda_times_ms", lambda *a, **k: [fake_time(*a, **k)] * 5)
    monkeypatch.setattr(runner, "cuda_peak_memory",
                        lambda fn, grad_to_none=(): {"peak_bytes": 3 << 20, "peak_extra_bytes": 1 << 20})
    monkeypatch.setattr(floor, "floor_fn", lambda seq_len, device="cuda": (lambda: None))
    cfg = Config(2, 3, 4, 2, 3)
    torch.manual_seed(0)
    ref = parity.make_reference(cfg, "cpu")
    ours = runner.default_candidate(cfg, "torch", torch.device("cpu"))
    ours.load_state_dict(ref.state_dict())
    res = {"config": cfg.to_dict(), "label": cfg.label, "status": "ok", "status_text": "ok", "parity": {}}
    auto = runner.default_candidate(cfg, "auto", torch.device("cpu"))
    auto.load_state_dict(ref.state_dict())
    res.update(runner._time_cuda(cfg, ours, ref, ["fwd", "fwd_bwd"], Options(device="cuda", quick=True), {},
                                 auto=auto))
    res["auto_runs"] = runner.auto_runs(cfg, auto, torch.device("cpu"))
    assert res["fwd"]["auto_ms"] == 2.0 and res["fwd_bwd"]["auto_ratio"] == 1.0  # auto beside the pinned kernels
    assert res["auto_runs"]["fwd"]["runs"] in ("aten", "torch", "auto")
    assert res["fwd"]["ratio"] == 1.0 and res["fwd_bwd"]["ratio"] == 1.0
    assert res["fwd"]["ratio_ci95"] == [1.0, 1.0] and res["fwd"]["converged"] and res["fwd"]["rounds"] == 1
    assert res["fwd"]["ours_tflops"] == pytest.approx(cfg.forward_flops() / 2.0 / 1e9)
    assert res["fwd_bwd"]["ref_tflops"] == pytest.approx(3 * cfg.forward_flops() / 2.0 / 1e9)
    assert res["fwd_bwd"]["ours_peak_mib"] == 1.0
    assert res["per_step"]["floor_us"] == pytest.approx(2e3 / 3)
    assert res["per_step"]["ours_fwd_us"] == pytest.approx(2e3 / (2 * 3))
    assert calls[0] is None and calls[3] is not None  # forward (ours, cuDNN, auto): no grads to reset; fwd+bwd: reset
    env = dict(report.environment("cpu"), device="cuda", gpu_name="stand-in", machine="GPU stand-in",
               allow_tf32=True)
    payload = {"suite": "tiny", "quick": True, "env": env, "results": [res]}
    md = report.markdown_report(payload)
    assert "cuDNN" in md and "us/step fwd (floor)" in md and "GPU stand-in" in md
    assert "| fwd auto ratio | fwd+bwd auto ratio | auto runs fwd / fwd+bwd |" in md and "(default)" in md
    assert "ratio = cuDNN time / ours (> 1: ours faster" in md and "1.00x [1.00-1.00]" in md
    assert "allow_tf32 True" in report.stamp_line(env)
    written = report.write_plots(payload, tmp_path, "cuda")
    assert written and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)


def test_relu_kink_excuse_does_not_hide_a_wrong_gradient():
    """The ReLU-kink rule (fp32 gradients excused when the same candidate is exact in float64) must not
    excuse a candidate whose gradients are wrong in every precision."""
    from fused_birnn.bench.parity import check_parity, make_reference

    cfg = Config(2, 3, 4, 2, 5, nonlinearity="relu")
    torch.manual_seed(0)
    ref = make_reference(cfg, "cpu")
    cand = _factory(_WrongGradient)(cfg, "torch", torch.device("cpu"))
    cand.load_state_dict(ref.state_dict())
    p = check_parity(cfg, cand, ref, "cpu")
    assert p["fwd_ok"] and not p["bwd_ok"] and not p.get("note")


# ------------------------------------------------------------------------------------ the noise stopping rule
class _FakeClock:
    """Time that moves only when a scripted callable runs: the stopping rule without real timings."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def callable(self, durations):
        it = iter(durations)

        def run():
            self.now += next(it)

        return run


def _compare(ref_durations, ours_durations, **rule):
    from fused_birnn.bench.timing import StopRule, cpu_compare_ms

    clock = _FakeClock()
    fns = {"ours": clock.callable(ours_durations), "ref": clock.callable(ref_durations)}
    rule = StopRule(**{"min_runs": 5, "max_runs": 200, "min_time_s": 0.0, "max_time_s": 1e9, "check_every": 1,
                       **rule})
    return cpu_compare_ms(fns, warmup=0, rule=rule, clock=clock)


def _forever(*values):
    while True:
        yield from values


def test_stop_rule_steady_ratio_stops_at_the_first_check():
    res = _compare(_forever(0.012), _forever(0.010))
    r = res["ratio"]
    assert r["stop"] == "converged" and r["converged"] and r["rounds"] == 5
    assert r["ratio"] == pytest.approx(1.2) and r["ci95"] == pytest.approx([1.2, 1.2])
    assert res["times"]["ref"]["median_ms"] == pytest.approx(12.0) and res["times"]["ours"]["runs"] == 5


def test_stop_rule_noise_that_never_settles_hits_the_round_cap_and_is_flagged():
    # ABBA blocks (rounds 2k, 2k+1) of ref take 0.01 s and 0.04 s in turn against ours' 0.02 s
    res = _compare(_forever(0.005, 0.005, 0.020, 0.020), _forever(0.010), max_runs=40)
    r = res["ratio"]
    assert r["stop"] == "max_runs" and not r["converged"] and r["rounds"] == 40
    assert r["ratio"] == pytest.approx(1.25)  # median of ten 0.5s and ten 2.0s
    lo, hi = r["ci95"]
    assert lo < 1.25 * 0.95 or hi > 1.25 * 1.05
    assert r["rel_halfwidth"] > 0.05


def test_stop_rule_time_cap():
    # a round takes 1.5, 1.5, 3, 3 s of fake time: 1.5, 3, 6, 9, 10.5 -> five rounds reach 10 s
    res = _compare(_forever(0.5, 0.5, 2.0, 2.0), _forever(1.0), max_time_s=10.0)
    assert res["ratio"]["stop"] == "max_time" and res["ratio"]["rounds"] == 5 and not res["ratio"]["converged"]


def test_stop_rule_waits_for_minimum_time_and_converges_once_noise_stops():
    noisy_then_calm = lambda: iter([0.005, 0.005, 0.020, 0.020] * 8 + [0.010] * 10_000)  # noqa: E731
    res = _compare(noisy_then_calm(), _forever(0.010), max_runs=10_000)
    r = res["ratio"]
    assert r["stop"] == "converged" and r["converged"] and 30 < r["rounds"] < 10_000
    assert r["ratio"] == 1.0 and r["rel_halfwidth"] <= 0.05
    assert _compare(noisy_then_calm(), _forever(0.010), max_runs=10_000)["ratio"]["rounds"] == r["rounds"]
    # a minimum time: steady from the start, but the rule keeps going until 3 s of fake time have passed
    slow = _compare(_forever(0.2), _forever(0.1), min_time_s=3.0)
    assert slow["ratio"]["rounds"] == 10 and slow["ratio"]["converged"]


def test_candidates_alternate_in_abba_order_and_a_place_in_the_round_cancels():
    """Two identical callables, but whichever runs first in a round takes 10% longer (warm-up, caches):
    in a fixed order that read as a 10% difference; the order flips every round and the ratio is taken
    over ABBA blocks, so it reads 1.0 exactly."""
    from fused_birnn.bench.timing import StopRule, abba_blocks, cpu_compare_ms

    clock, calls = _FakeClock(), []

    def candidate(name):
        def run():
            clock.now += 0.011 if len(calls) % 2 == 0 else 0.010  # first of the round: slower
            calls.append(name)
        return run

    res = cpu_compare_ms({"ours": candidate("ours"), "ref": candidate("ref")}, warmup=2, clock=clock,
                         rule=StopRule(min_runs=6, max_runs=6, min_time_s=0.0, check_every=1))
    assert calls[:8] == ["ours", "ref", "ref", "ours", "ours", "ref", "ref", "ours"]  # warm-up too
    r = res["ratio"]
    assert r["ratio"] == pytest.approx(1.0) and r["ci95"] == pytest.approx([1.0, 1.0]) and r["converged"]
    assert abba_blocks([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == ([3.0, 7.0], [2.0, 2.0])  # last round unpaired
    assert abba_blocks([1.0], [2.0]) == ([1.0], [2.0])


def test_each_candidate_gets_the_same_inputs_in_a_round():
    from fused_birnn.bench.timing import Rotating

    inputs = Rotating(Config(1, 3, 4, 2, 3), "cpu")
    a, b = inputs.cursor(), inputs.cursor()
    seq = [(a.next()[0], b.next()[0]) for _ in range(4)]
    assert all(x is y for x, y in seq) and seq[0][0] is not seq[1][0] and seq[3][0] is seq[0][0]


def test_stop_rule_without_a_pair_stops_at_the_minimum():
    from fused_birnn.bench.timing import StopRule, cpu_compare_ms

    clock = _FakeClock()
    res = cpu_compare_ms({"ours": clock.callable(_forever(0.01))}, warmup=0, clock=clock,
                         rule=StopRule(min_runs=4, min_time_s=0.0))
    assert res["ratio"] is None and res["times"]["ours"]["runs"] == 4


def test_ratio_interval():
    from fused_birnn.bench.timing import ratio_interval

    r, lo, hi = ratio_interval([2.0, 4.0, 6.0, 8.0, 10.0], [2.0] * 5, paired=True)
    assert r == 3.0 and lo < 3.0 < hi and lo >= 1.0 and hi <= 5.0
    assert ratio_interval([2.0] * 7, [1.0] * 7, paired=False) == (2.0, 2.0, 2.0)
    a = ratio_interval([1.0, 1.1, 0.9, 1.05] * 10, [1.0] * 40, paired=True, seed=3)
    assert a == ratio_interval([1.0, 1.1, 0.9, 1.05] * 10, [1.0] * 40, paired=True, seed=3)  # deterministic


def _one_config_run(tmp_path, monkeypatch, bound):
    from fused_birnn.bench import runner
    from fused_birnn.bench.timing import StopRule

    monkeypatch.setattr(runner, "CPU_QUICK_RULE", StopRule(bound=bound, min_runs=4, max_runs=6, min_time_s=0.0,
                                                           max_time_s=5.0, check_every=1))
    return run_suite("tiny", tmp_path, Options(**QUIET), configs=[Config(1, 3, 4, 2, 3)])


def test_unconverged_ratios_are_flagged_in_json_markdown_and_plot(tmp_path, monkeypatch):
    payload = _one_config_run(tmp_path, monkeypatch, bound=-1.0)  # no interval is ever narrow enough
    saved = json.loads((tmp_path / "tiny_quick.json").read_text())
    assert saved["not_converged"] == ["L1 I3 H4 B2 T3 fp32 forward", "L1 I3 H4 B2 T3 fp32 forward+backward"]
    assert saved["results"][0]["fwd"]["converged"] is False and saved["results"][0]["fwd"]["rounds"] == 6
    assert any("did not converge" in n for n in saved["results"][0]["notes"])
    md = (tmp_path / "tiny_quick.md").read_text()
    assert "Did not converge" in md and "]*" in md
    from fused_birnn.bench import report

    assert any("did not converge" in line for line in report.ratio_legend(payload))
    assert any("did not converge" in n for n in report._plot_notes(payload))

    payload = _one_config_run(tmp_path, monkeypatch, bound=1e9)  # any interval will do
    assert payload["not_converged"] == [] and payload["results"][0]["fwd"]["converged"]
    assert payload["results"][0]["fwd"]["rounds"] == 4  # the first check: two ABBA blocks
    assert "Did not converge" not in (tmp_path / "tiny_quick.md").read_text()


# ------------------------------------------------------------------------------------ terminal and plots
def test_default_results_folder_is_new_each_time(tmp_path):
    import datetime

    from fused_birnn.bench.cli import default_out

    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first = default_out("cpu", tmp_path, now)
    assert first == tmp_path / "cpu-20260102-030405"
    first.mkdir()
    second = default_out("cpu", tmp_path, now)
    assert second == tmp_path / "cpu-20260102-030405-2"
    assert default_out("cpu").parts[0] == "fused_birnn-results"  # relative to the current folder


def test_every_option_has_help():
    from fused_birnn.bench.cli import _parser

    for action in _parser()._actions:
        assert action.help, action.option_strings


def test_progress_lines_are_cut_between_words_only():
    from fused_birnn.bench.report import fit_words

    label = "tagger: L2 I100 H256 B32 T64 fp32 packed"
    assert fit_words(label, 100) == label
    for width in range(4, len(label)):
        cut = fit_words(label, width)
        assert len(cut) <= width
        kept = cut.removesuffix(" ...").removesuffix("...")
        assert label.startswith(kept) and (kept == "" or label[len(kept)] == " ")


def test_compile_step_reaches_its_end_and_says_how_it_went(tmp_path, monkeypatch):
    import io

    from fused_birnn.bench import report, runner

    buf = io.StringIO()
    real = report.progress
    monkeypatch.setattr(report, "progress", lambda *a, **k: real(*a, **dict(k, stream=buf, force=True)))

    def fake_attach(results, allow_tf32, jobs):
        for r in results:
            r["compile"] = [dict(kernel="birnn_fwd_kernel", target=t, dtype="float32", hidden_size=4, batch_size=2,
                                 error=None, problems=[]) for t in ("sm_80", "sm_90")]
        return None

    monkeypatch.setattr(runner, "attach_compile_report", fake_attach)
    payload = {"results": [{"config": Config(2, 3, 4, 2, 3).to_dict(), "label": "x"}]}
    runner._compile_step(payload, "tiny", Options(**dict(QUIET, progress=True)), allow_tf32=True)
    assert "1/1" in buf.getvalue().splitlines()[-1] or "1/1" in buf.getvalue().split("\r")[-1]
    assert payload["compile_summary"].startswith("compile table: 2 kernel compiles for sm_80/sm_90, 0 failed")
    monkeypatch.setattr(runner, "attach_compile_report", lambda *a: "ptxas crashed")
    runner._compile_step(payload, "tiny", Options(**QUIET), allow_tf32=True)
    assert payload["compile_summary"] == "compile table not available: ptxas crashed"


def test_allow_tf32_is_stamped_on_gpu_runs_only():
    from fused_birnn.bench import report

    env = report.environment("cpu")
    assert "allow_tf32" not in env and "allow_tf32" not in report.stamp_line(env)
    gpu = report.environment("cuda")
    assert f"allow_tf32 {torch.backends.cudnn.allow_tf32}" in report.stamp_line(gpu)


def test_interpreter_numpy_warning(monkeypatch):
    import numpy
    import triton

    from fused_birnn.bench.cli import interpreter_numpy_problem

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    assert "numpy < 2.4" in interpreter_numpy_problem()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert interpreter_numpy_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert interpreter_numpy_problem() is None


def _synthetic_payload(busy_pct: float) -> dict:
    from fused_birnn.bench import report

    env = dict(report.environment("cpu"), cpu_busy_by_others_pct_at_start=busy_pct)
    results = []
    for i, (fwd, fb) in enumerate(((0.8, 1.3), (1.1, 2.05), (0.95, 1.0))):
        cfg = Config(2, 3, 4, 2, 3 + i)
        results.append({"config": cfg.to_dict(), "label": cfg.label, "status": "ok", "status_text": "ok",
                        "fwd": {"ratio": fwd, "ratio_ci95": [fwd * 0.97, fwd * 1.02], "converged": True},
                        "fwd_bwd": {"ratio": fb, "ratio_ci95": [fb * 0.9, fb * 1.1], "converged": False}})
    return {"suite": "tiny", "env": env, "results": results, "noise_rule": {"bound": 0.05},
            "not_converged": [f"{r['label']} forward+backward" for r in results]}


def test_speedup_plot_values_legend_and_warning():
    from matplotlib.patches import Rectangle

    from fused_birnn.bench import report

    plt = report._pyplot()
    fig = report.speedup_figure(_synthetic_payload(busy_pct=60.0))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    for v in ("0.80x", "1.10x", "0.95x", "1.30x*", "2.05x*", "1.00x*"):  # every value, flagged when unsettled
        assert v in texts, (v, texts)
    assert any("WARNING: other processes used up to 60%" in t for t in texts)
    assert any("did not converge" in t for t in texts)
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, Rectangle) and p.get_width() > 0]
    assert len(bars) == 6 and not any(legend.overlaps(b) for b in bars)
    plt.close(fig)
    quiet = report.speedup_figure(_synthetic_payload(busy_pct=1.0) | {"not_converged": []})
    assert not any("WARNING" in t.get_text() or "converge" in t.get_text() for t in quiet.axes[0].texts)
    plt.close(quiet)


# ------------------------------------------------------------------------------------ LSTM and GRU
# The workloads' shapes (shared/research/lstm-gru.md section 3): (cell, layers, I, H, proj_size, B, T, packed)
LSTM_GRU_GPU = {
    "pyannote": [("LSTM", 4, 60, 128, 0, 32, 589, False)],
    "tacotron2": [("LSTM", 1, 512, 256, 0, 64, 150, True)],
    "openunmix": [("LSTM", 3, 512, 256, 0, 16, 259, False)],
    "espnet": [("LSTM", 1, 80, 320, 0, 30, 800, True), ("LSTM", 1, 320, 320, 0, 30, 400, True),
               ("LSTM", 1, 320, 320, 0, 30, 200, True)],
    "deepspeech": [("LSTM", 5, 1312, 1024, 0, 32, 300, False)],
    "deepspeech2": [("GRU", 5, 1312, 1024, 0, 32, 300, False)],
    "nemo": [("LSTM", 8, 640, 2048, 320, 16, 418, False)],
}


def _shape(c: Config) -> tuple:
    return (c.cell, c.num_layers, c.input_size, c.hidden_size, c.proj_size, c.batch, c.seq_len, c.packed)


def test_lstm_gru_suites_have_the_workloads_shapes():
    from fused_birnn.bench.cli import expand_suites

    assert set(LSTM_GRU_SUITES) == set(LSTM_GRU_GPU) and set(ALL) == set(RNN_SUITES) | set(LSTM_GRU_SUITES)
    for name, want in LSTM_GRU_GPU.items():
        gpu = get_suite(name, "cuda")
        assert sorted({_shape(c) for c in gpu}) == sorted(want), name
        assert {c.dtype for c in gpu} == {"fp32", "fp16", "bf16"} and len(gpu) == 3 * len(want)
        cpu, quick = get_suite(name, "cpu"), get_suite(name, "cpu", quick=True)
        assert {c.dtype for c in cpu} == {"fp32"} and 1 <= len(quick) <= len(cpu) <= len(want)
        big = max(c.forward_flops() for c in gpu)
        for c in cpu + quick + get_suite(name, "cuda", quick=True):  # same structure, smaller
            assert (c.cell, c.num_layers, c.packed, c.batch_first, bool(c.proj_size)) == \
                (gpu[0].cell, gpu[0].num_layers, gpu[0].packed, gpu[0].batch_first, bool(gpu[0].proj_size))
            assert c.forward_flops() < big or c in gpu
    assert expand_suites(["lstm-gru", "nemo", "seed"]) == [*LSTM_GRU_SUITES, "seed"]
    assert expand_suites(["all"]) == list(ALL) and expand_suites(["rnn"]) == list(RNN_SUITES)
    with pytest.raises(ValueError, match="nosuch"):
        expand_suites(["seed", "nosuch"])


def test_forward_flops_count_every_weight_matrix():
    """One multiply-add per weight-matrix entry, batch row and step: forward FLOPs = 2*T*B*(entries of every
    weight matrix), whatever the cell, projection and layer count (counted on nn's own modules)."""
    from fused_birnn.bench.parity import make_reference

    cases = [Config(3, 5, 7, 2, 4), Config(2, 5, 8, 3, 4, cell="LSTM", proj_size=3), Config(2, 1, 6, 2, 3, cell="GRU")]
    cases += [c for name in LSTM_GRU_SUITES for c in get_suite(name, "cuda", dtypes=("fp32",))]
    for c in cases:
        m = make_reference(c, "meta")
        entries = sum(p.numel() for n, p in m.named_parameters() if n.split(".")[-1].startswith("weight"))
        assert c.forward_flops() == 2 * c.seq_len * c.batch * entries, c.label


def test_config_rejects_what_the_cells_do_not_have():
    with pytest.raises(ValueError, match="proj_size"):
        Config(1, 3, 4, 2, 3, cell="GRU", proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        Config(1, 3, 4, 2, 3, cell="LSTM", proj_size=4)  # must be < hidden_size, as in nn.LSTM
    with pytest.raises(ValueError, match="cell"):
        Config(1, 3, 4, 2, 3, cell="Mamba")
    with pytest.raises(ValueError, match="nonlinearity"):
        Config(1, 3, 4, 2, 3, cell="GRU", nonlinearity="relu")
    lstm = Config(2, 3, 5, 2, 3, cell="LSTM", proj_size=3)
    assert lstm.label == "LSTM L2 I3 H5 P3 B2 T3 fp32" and Config(2, 3, 4, 2, 3).label == "L2 I3 H4 B2 T3 fp32"
    assert Config(**lstm.to_dict()) == lstm  # the JSON round trip the compile step relies on


LSTM_GRU_TINY = [
    Config(2, 3, 5, 2, 3, batch_first=True, cell="LSTM", proj_size=3),
    Config(1, 1, 7, 5, 1, packed=True, cell="LSTM"),  # I=1, T=1, odd H and B, packed
    Config(2, 3, 4, 3, 4, packed=True, cell="GRU"),
]


def test_lstm_and_gru_are_parity_gated_and_timed(tmp_path):
    """fused_birnn.LSTM / GRU against nn.LSTM / GRU: every state (h_n, c_n) and every gradient (input, h0,
    c0, each parameter, weight_hr with a projection) is compared before timing; files and text name the
    reference."""
    from fused_birnn.bench import report
    from fused_birnn.bench.parity import make_reference

    payload = run_suite("tiny", tmp_path, Options(**QUIET, plots=False), configs=LSTM_GRU_TINY)
    assert payload["reference"] == "torch.nn"  # mixed cells
    for r, cfg in zip(payload["results"], LSTM_GRU_TINY):
        assert r["status"] == "ok", r["status_text"]
        p = r["parity"]["ours"]
        assert p["backend"] == "auto" and p["reference"] == f"nn.{cfg.cell}"
        states = ["h", "c"] if cfg.cell == "LSTM" else ["h"]
        assert set(p["tensors"]["fwd"]) == {"output"} | {f"{s}_n" for s in states}
        params = {f"grad_{n}" for n, _ in make_reference(cfg, "cpu").named_parameters()}
        assert set(p["tensors"]["fwd+bwd"]) == ({"output", "grad_input"} | {f"{s}_n" for s in states}
                                                | {f"grad_{s}0" for s in states} | params)
        assert any("weight_hr" in n for n in params) == bool(cfg.proj_size)
        assert r["parity"]["torch"]["fwd_ok"] and r["parity"]["torch"]["bwd_ok"]
        if INTERPRETER:  # the gated kernels, interpreted, passed the same gate
            assert r["parity"]["triton"]["fwd_ok"] and r["parity"]["triton"]["bwd_ok"]
        for mode in ("fwd", "fwd_bwd"):
            assert r[mode]["ours_ms"] > 0 and r[mode]["ref_ms"] > 0 and r[mode]["ratio"] > 0
            assert r["auto_runs"][mode]["runs"] in ("aten", "torch")  # what auto ran, in the table too
    assert "# fused_birnn vs torch.nn.RNN/LSTM/GRU: suite `tiny`" in (tmp_path / "tiny_quick.md").read_text()
    assert "auto runs fwd / fwd+bwd" in (tmp_path / "tiny_quick.md").read_text()
    lstm_only = dict(payload, reference="nn.LSTM", results=payload["results"][:2])
    md = report.markdown_report(lstm_only)
    assert "# fused_birnn vs torch.nn.LSTM" in md and "ratio = nn.LSTM time / ours" in md
    assert "CPU fwd nn.LSTM ms" in md and "c_n" in md


class _WrongCellState(fused_birnn.LSTM):
    """Right output and h_n, c_n 1% off: only the cell state can tell."""

    def forward(self, input, hx=None, lengths=None):
        out, (h_n, c_n) = super().forward(input, hx, lengths)
        return out, (h_n, c_n * 1.01)


def test_a_wrong_cell_state_is_a_parity_failure(tmp_path):
    from fused_birnn.bench.parity import module_kwargs

    def factory(cfg, backend, device):
        return wrap_packed(_WrongCellState(cfg.input_size, cfg.hidden_size, cfg.num_layers, **module_kwargs(cfg),
                                           device=device, dtype=cfg.torch_dtype, backend=backend), cfg)

    cfg = LSTM_GRU_TINY[0]
    payload = run_suite("tiny", tmp_path, Options(**QUIET, plots=False, candidate_factory=factory), configs=[cfg])
    r = payload["results"][0]
    rows = r["parity"]["ours"]["tensors"]["fwd"]
    assert rows["output"]["ok"] and rows["h_n"]["ok"] and not rows["c_n"]["ok"]
    assert r["status"] == "parity_failure" and r["fwd"] is None and "FAIL fwd (c_n" in r["status_text"]


def test_compile_step_lists_every_lstm_gru_configuration(tmp_path, monkeypatch):
    """`--compile-only` on an LSTM/GRU suite: each configuration is listed with its compiles, or with why
    there are none (a compile_report without a cell argument); with one, the cell and proj_size reach it."""
    import dataclasses

    from fused_birnn import compile_report
    from fused_birnn.bench import runner

    seen = []

    def fake_compile_report(cases, jobs=1):  # rows as compile_report returns them, each a (stand-in) failure
        seen.extend(cases)
        return [dict(c, kernel=k, target="sm_90", error="stand-in", block_b=16, block_h=64, num_warps=4, programs=2)
                for c in cases for k in ("birnn_fwd_kernel", "birnn_bwd_kernel")]

    fields = {f.name for f in dataclasses.fields(compile_report.CompileCase)}
    monkeypatch.setattr(compile_report, "compile_report", fake_compile_report)
    monkeypatch.setattr(runner, "_compile_case_fields", lambda: fields | {"cell", "proj_size"})
    payload = run_suite("nemo", tmp_path, Options(device="cpu", progress=False), compile_only=True, sizing="cuda",
                        dtypes=("fp16",))
    assert [c["cell"] for c in seen] == ["LSTM"] and seen[0]["proj_size"] == 320 and seen[0]["hidden_size"] == 2048
    assert payload["compile_error"] is None and len(payload["results"][0]["compile"]) == 2
    md = (tmp_path / "nemo_fp16_compile.md").read_text()
    assert "- LSTM L8 I640 H2048 P320 B16 T418 fp16: 2 kernel compile(s), 2 failed" in md

    monkeypatch.setattr(runner, "_compile_case_fields", lambda: fields - {"cell", "proj_size"})
    seen.clear()
    payload = run_suite("espnet", tmp_path, Options(device="cpu", progress=False), compile_only=True, sizing="cuda",
                        dtypes=("fp16",))
    assert not seen and "cannot compile the LSTM cell" in payload["compile_error"]
    md = (tmp_path / "espnet_fp16_compile.md").read_text()
    for want in LSTM_GRU_GPU["espnet"]:
        assert f"- LSTM L1 I{want[2]} H320 B30 T{want[6]} fp16 packed: not compiled (" in md
