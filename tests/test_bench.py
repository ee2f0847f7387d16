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
from fused_birnn.bench.suites import ALL, SUITES
from fused_birnn.functional import INTERPRETER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAMPS = ("torch", "triton", "cuda", "cudnn", "driver", "allow_tf32", "date", "cpu_model", "gpu_name")
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
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "fused_birnn.bench", "--suite", "tiny", "--device", "cpu", "--quick",
         "--no-compile", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU fwd ratio" in proc.stdout  # the final table
    assert "tiny [" in proc.stderr  # the progress bar
    payload = _check_files(tmp_path, "tiny_quick")
    assert payload["env"]["device"] == "cpu"
    assert len(payload["results"]) == 3  # two padded shapes and a packed one
    assert [r["config"]["packed"] for r in payload["results"]] == [False, False, True]
    for r in payload["results"]:
        assert r["status"] == "ok", r["status_text"]
        assert r["parity"]["ours"]["backend"] == "torch"
        assert r["parity"]["ours"]["fwd_ok"] and r["parity"]["ours"]["bwd_ok"]
        if INTERPRETER:  # the kernels, interpreted, passed the same gate (untimed)
            assert r["parity"]["triton"]["fwd_ok"] and r["parity"]["triton"]["bwd_ok"]
        for mode in ("fwd", "fwd_bwd"):
            assert r[mode]["ours_ms"] > 0 and r[mode]["ref_ms"] > 0 and r[mode]["ratio"] > 0


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


def test_compile_only_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fused_birnn.bench", "--suite", "tiny", "--compile-only", "--dtype", "fp16",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "tiny_fp16_compile.json").read_text())
    assert payload["compile_error"] is None, payload["compile_error"]
    rows = payload["results"][0]["compile"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
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
    monkeypatch.setattr(runner, "cuda_peak_memory",
                        lambda fn, grad_to_none=(): {"peak_bytes": 3 << 20, "peak_extra_bytes": 1 << 20})
    monkeypatch.setattr(floor, "floor_fn", lambda seq_len, device="cuda": (lambda: None))
    cfg = Config(2, 3, 4, 2, 3)
    torch.manual_seed(0)
    ref = parity.make_reference(cfg, "cpu")
    ours = runner.default_candidate(cfg, "torch", torch.device("cpu"))
    ours.load_state_dict(ref.state_dict())
    res = {"config": cfg.to_dict(), "label": cfg.label, "status": "ok", "status_text": "ok", "parity": {}}
    res.update(runner._time_cuda(cfg, ours, ref, ["fwd", "fwd_bwd"], Options(device="cuda", quick=True), {}))
    assert res["fwd"]["ratio"] == 1.0 and res["fwd_bwd"]["ratio"] == 1.0
    assert res["fwd"]["ours_tflops"] == pytest.approx(cfg.forward_flops() / 2.0 / 1e9)
    assert res["fwd_bwd"]["ref_tflops"] == pytest.approx(3 * cfg.forward_flops() / 2.0 / 1e9)
    assert res["fwd_bwd"]["ours_peak_mib"] == 1.0
    assert res["per_step"]["floor_us"] == pytest.approx(2e3 / 3)
    assert res["per_step"]["ours_fwd_us"] == pytest.approx(2e3 / (2 * 3))
    assert calls[0] is None and calls[2] is not None  # forward: no grads to reset; fwd+bwd: reset
    env = dict(report.environment("cpu"), device="cuda", gpu_name="stand-in", machine="GPU stand-in")
    payload = {"suite": "tiny", "quick": True, "env": env, "results": [res]}
    md = report.markdown_report(payload)
    assert "cuDNN" in md and "us/step fwd (floor)" in md and "GPU stand-in" in md
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
