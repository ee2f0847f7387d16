"""Benchmarks: `fused_birnn.RNN` against `torch.nn.RNN` (cuDNN on CUDA) on identical weights and inputs.

    python -m fused_birnn.bench --suite NAME [NAME ...] [--device cuda|cpu] [--out DIR] [--quick]
                                [--dtype fp32 fp16 bf16] [--compile-only] [--no-compile]

Suites: seed, deepbench, speech, tagger, latency, scaling (`all`: every one), tiny (tests). For every
configuration, first the parity gate (`parity.py`: outputs, h_n and, for forward+backward, every gradient
against nn.RNN; a candidate that fails is reported as a parity FAILURE and not timed), then

* CUDA: forward and forward+backward times (`triton.testing.do_bench`, median, CUDA events), ratio
  cuDNN / ours, peak memory, TFLOP/s, time per sequential step against an empty persistent loop's;
* CPU: the pure-PyTorch path (`backend='torch'`) against nn.RNN on the same CPU, wall-clock medians;
  the Triton kernels through the interpreter for the parity gate only (the command re-executes itself
  with `TRITON_INTERPRET=1` so that they can run);

then the sm_80/sm_90 compile table of every configuration's kernels (`fused_birnn.compile_report`). Writes
`<suite>.json` (raw), `<suite>.md` (table) and PNG plots under `--out` (default `bench/results/gpu|cpu/`),
each stamped with the machine, driver, torch, triton, CUDA, cuDNN, allow_tf32 and the date.

Library use (tests): `run_suite(name, out_dir, Options(device="cpu", candidate_factory=...))`.
"""

from .parity import check_parity, scaled_error
from .runner import Options, default_candidate, run_config, run_suite
from .suites import ALL, SUITES, Config, get_suite

__all__ = ["ALL", "SUITES", "Config", "Options", "check_parity", "default_candidate", "get_suite", "run_config",
           "run_suite", "scaled_error"]
