"""On a GPU: the plan kinds of the one-product kernels against cuDNN at the workloads' sizes (short T), and
the cooperative launch.

* The planner's own plan for each workload: a persistent split plan asks CUDA for a cooperative launch
  (`launch_cooperative_grid`) and gets it, no warning.
* A cooperative launch the device refuses (a grid far larger than it holds at once): a warning naming the
  layer, the steps run one launch each, the same results as the PyTorch path.
* Every kind of plan, forced through the planner: fully resident with the "dz" and the "dh" backward
  exchange, partially resident (half the chunks streamed), streamed; each cell (LSTM, LSTM with
  proj_size, GRU, Elman), forward and backward against cuDNN (the criterion of tests/test_cuda.py:
  no worse than twice cuDNN's own error against float64, plus a floor).

Run with `TRITON_INTERPRET=0 pytest -m cuda tests` (bench/gpu_run.sh runs these first)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from conftest import assert_no_worse_than_cudnn
from torch import nn

import fused_birnn
from fused_birnn.kernels import backward as kb
from fused_birnn.kernels import forward as kf
from fused_birnn.kernels import launch
from fused_birnn.kernels.config import select_config

pytestmark = pytest.mark.cuda

CLASSES = {"RNN": (fused_birnn.RNN, nn.RNN), "LSTM": (fused_birnn.LSTM, nn.LSTM), "GRU": (fused_birnn.GRU, nn.GRU)}
# (cell, I, H, proj, T, B): deepspeech, DeepSpeech2, NeMo, ESPnet, Tacotron 2 (B 64), DeepBench Elman
WORKLOADS = [
    ("LSTM", 161, 1024, 0, 24, 32), ("GRU", 161, 1024, 0, 24, 32), ("LSTM", 320, 2048, 320, 12, 16),
    ("LSTM", 80, 320, 0, 24, 30), ("LSTM", 128, 256, 0, 24, 64), ("RNN", 256, 1760, 0, 16, 32),
]


def _make(cell, I, H, proj, dtype):
    extra = {"proj_size": proj} if proj else {}
    ours_cls, ref_cls = CLASSES[cell]
    ref64 = ref_cls(I, H, 1, bidirectional=True, device="cuda", dtype=torch.float64, **extra)
    cudnn = ref_cls(I, H, 1, bidirectional=True, device="cuda", dtype=dtype, **extra)
    ours = ours_cls(I, H, 1, bidirectional=True, device="cuda", dtype=dtype, backend="triton", **extra)
    cudnn.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    return ref64, cudnn, ours


def _run(model, x):
    dtype = next(model.parameters()).dtype
    xs = x.to(dtype).requires_grad_()
    out, state = model(xs)
    states = state if isinstance(state, tuple) else (state,)
    loss = out.double().square().sum() + sum(s.double().sum() for s in states)
    return [out, *states, *torch.autograd.grad(loss, [xs, *model.parameters()])]


def _against_cudnn(cell, I, H, proj, T, B, dtype):
    ref64, cudnn, ours = _make(cell, I, H, proj, dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    assert_no_worse_than_cudnn(_run(ref64, x), _run(cudnn, x), _run(ours, x), dtype)
    launch.check_errors("cuda")


def _plan(cell, H, B, proj, dtype):
    return select_config(H, B, dtype, dtype == torch.float32 and torch.backends.cudnn.allow_tf32,
                         kf.device_limits(torch.device("cuda")), None,
                         None if cell == "RNN" else cell, proj or None)


@pytest.mark.parametrize("size", WORKLOADS, ids=lambda s: "{}-H{}-P{}-B{}".format(s[0], s[2], s[3], s[5]))
def test_planned_cooperative_launch(size, monkeypatch, no_tf32):
    """The planner's plan for the workload runs as planned: a persistent split plan is launched
    cooperatively, accepted (no warning), and matches cuDNN."""
    cell, I, H, proj, T, B = size
    asked = []
    real = launch._launch

    def spy(kernel, grid, *a, **kw):
        asked.append(bool(kw.get("launch_cooperative_grid")))
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(launch, "_launch", spy)
    cfg = _plan(cell, H, B, proj, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _against_cudnn(cell, I, H, proj, T, B, torch.float16)
    if cfg.programs_per_group(H) > 1 and cfg.persistent:
        assert asked and all(asked), (cfg, asked)


def test_refused_cooperative_launch_runs_per_step(monkeypatch, no_tf32):
    """A persistent split grid of 8,192 programs, cooperative: the device refuses it at launch; a
    RuntimeWarning names the layer and the steps run one launch each, matching the PyTorch path."""
    from fused_birnn.kernels.config import RecurrenceConfig

    cfg = RecurrenceConfig(16, 16, False, split=256, block_k=64, block_k_backward=64, persistent=True,
                           exchange="dz", cooperative=True)
    for module in (kf, kb):
        monkeypatch.setattr(module, "select_config", lambda *a, **k: cfg)
    monkeypatch.setattr(launch, "_WARNED", set())
    m = fused_birnn.RNN(64, 4096, 1, bidirectional=True, device="cuda", dtype=torch.float16, backend="triton")
    ref = fused_birnn.RNN(64, 4096, 1, bidirectional=True, device="cuda", dtype=torch.float16, backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="cooperative launch of the forward"):
        out, h_n = m(x)
    launch.check_errors("cuda")
    with torch.no_grad():
        r_out, r_hn = ref(x)
    torch.testing.assert_close(out.float(), r_out.float(), atol=2e-2, rtol=2e-2)


KINDS = ["dz", "dh", "partial", "streamed"]


def _kind(cfg, kind, cell, H, B, proj, dtype):
    """The planner's plan turned into `kind`: the backward exchanging dz or dh (refitted to the device:
    warps and resident chunks), half of each pass's resident chunks, or nothing resident."""
    from fused_birnn.kernels import config as C

    if kind in ("dz", "dh"):
        G = C.gate_count(None if cell == "RNN" else cell)
        tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
        fitted = C._fit(replace(cfg, exchange=kind), H, proj or H, G, proj, dtype.itemsize,
                        kf.device_limits(torch.device("cuda")), cfg.num_batch_tiles(B), False, dtype, tf32, B)
        if fitted is None:
            pytest.skip(f"no {kind} plan fits this device at this size")
        return fitted
    if kind == "partial":
        return replace(cfg, resident_chunks=max(1, (cfg.resident_chunks or 2) // 2),
                       resident_chunks_backward=max(1, (cfg.resident_chunks_backward or 2) // 2))
    return replace(cfg, w_on_chip=False, resident_chunks=0, resident_chunks_backward=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", WORKLOADS[:4] + WORKLOADS[5:], ids=lambda s: "{}-H{}-P{}".format(s[0], s[2], s[3]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_plan_kind_against_cudnn(size, kind, dtype, monkeypatch, no_tf32):
    """The planner's split and tiles for the workload, with the backward's exchange or the residency
    forced to each kind (`_kind`)."""
    cell, I, H, proj, T, B = size
    cfg = _plan(cell, H, B, proj, dtype)
    if cfg.programs_per_group(H) == 1:
        pytest.skip("one program per group at this size")
    cfg = _kind(cfg, kind, cell, H, B, proj, dtype)
    for module in (kf, kb):
        monkeypatch.setattr(module, "select_config", lambda *a, **k: cfg)
    _against_cudnn(cell, I, H, proj, T, B, dtype)
