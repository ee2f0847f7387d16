"""pytest-benchmark benchmarks: fused_birnn.RNN / LSTM / GRU against torch.nn's, forward and forward+backward.

Not part of the CI test run (`testpaths = ["tests"]`); run them with

    pytest bench/                                   # all (CUDA ones skip without a GPU)
    pytest bench/ --benchmark-disable               # each once: a smoke test
    pytest bench/ -k cpu --benchmark-columns=median,iqr,rounds

CPU: `backend='torch'` (the pure-PyTorch path) against nn.RNN / nn.LSTM / nn.GRU on the same CPU. CUDA: the
Triton kernels against cuDNN; the timed function synchronizes (pytest-benchmark times with `time.perf_counter`, which
would otherwise only see the launches). Every fused_birnn benchmark first passes the parity gate of
`fused_birnn.bench.parity` (identical weights and inputs); a failure fails the test before any timing.
Ours and torch.nn's module of one configuration and mode share a benchmark group, so the table puts them together.

For ratios, machine stamps, plots and the compile table use `python -m fused_birnn.bench` instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_birnn.bench.parity import check_parity, make_reference, summarize
from fused_birnn.bench.runner import default_candidate
from fused_birnn.bench.suites import Config, get_suite
from fused_birnn.bench.timing import Rotating, clear_grads, forward_backward_fn, forward_fn, grad_leaves

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
CUDA_OK = torch.cuda.is_available() and not INTERPRETED
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and TRITON_INTERPRET unset/0")

SEED = Config(4, 25, 50, 15, 5, batch_first=True)
TAGGER = Config(2, 100, 256, 32, 64)
CPU_CONFIGS = {"seed": SEED, "tagger": TAGGER, "latency-small": Config(1, 64, 64, 1, 100),
               # LSTM / GRU at the CPU sizes of the bench's suites (fused_birnn.bench.suites)
               "pyannote": get_suite("pyannote", "cpu")[0], "nemo": get_suite("nemo", "cpu")[0],
               "deepspeech2": get_suite("deepspeech2", "cpu")[0]}
CUDA_CONFIGS = {
    "seed-fp32": SEED,
    "tagger-fp16": Config(2, 100, 256, 32, 64, dtype="fp16"),
    "tagger-fp32": TAGGER,
    "latency-fp16": Config(1, 256, 256, 8, 1000, dtype="fp16"),
    "deepbench-fp16": Config(1, 1760, 1760, 32, 50, dtype="fp16"),
    "pyannote-fp16": get_suite("pyannote", "cuda", dtypes=("fp16",))[0],
    "tacotron2-bf16": get_suite("tacotron2", "cuda", dtypes=("bf16",))[0],
    "deepspeech2-fp16": get_suite("deepspeech2", "cuda", dtypes=("fp16",))[0],
    "nemo-bf16": get_suite("nemo", "cuda", dtypes=("bf16",))[0],
}
CASES = ([pytest.param("cpu", name, id=f"cpu-{name}") for name in CPU_CONFIGS]
         + [pytest.param("cuda", name, id=f"cuda-{name}", marks=[needs_cuda, pytest.mark.cuda]) for name in CUDA_CONFIGS])


def _build(device: str, name: str, impl: str):
    cfg = (CPU_CONFIGS if device == "cpu" else CUDA_CONFIGS)[name]
    torch.manual_seed(0)
    ref = make_reference(cfg, device)
    if impl == "torch.nn":
        return cfg, ref
    ours = default_candidate(cfg, "torch" if device == "cpu" else "triton", torch.device(device))
    ours.load_state_dict(ref.state_dict())
    parity = check_parity(cfg, ours, ref, device)
    if not (parity["fwd_ok"] and parity["bwd_ok"]):
        pytest.fail(f"parity FAILURE, not timed: {summarize(parity)}")
    return cfg, ours


@pytest.mark.parametrize("impl", ["fused_birnn", "torch.nn"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("device, name", CASES)
def test_rnn(benchmark, device, name, mode, impl):
    cfg, model = _build(device, name, impl)
    inputs = Rotating(cfg, device)
    step = forward_fn(model, inputs) if mode == "fwd" else forward_backward_fn(model, inputs)
    leaves = grad_leaves(model, inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if mode == "fwd_bwd":
            clear_grads(leaves)  # no accumulation into .grad across rounds
        step()
        sync()  # the timer must see the kernels finish, not only their launch

    for _ in range(3):  # warm-up: Triton compiles, cuDNN plans, allocator caches
        run()
    label = "CPU " if device == "cpu" else ""
    benchmark.group = f"{label}{cfg.label} {mode}"
    benchmark.extra_info.update(config=cfg.to_dict(), impl=impl, mode=mode, device=device,
                                torch=torch.__version__, threads=torch.get_num_threads())
    benchmark(run)
