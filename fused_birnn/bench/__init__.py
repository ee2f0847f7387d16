"""Benchmarks: `fused_birnn.RNN` against `torch.nn.RNN` (cuDNN on CUDA) on identical weights and inputs.

    python -m fused_birnn.bench --suite NAME [NAME ...] [--device cuda|cpu] [--out DIR] [--quick]
                                [--dtype fp32 fp16 bf16] [--compile-only] [--no-compile]

Suites: seed, deepbench, speech, tagger, latency, scaling (`all`: every one), tiny (tests). For every
configuration, first the parity gate (`parity.py`: outputs, h_n and, for forward+backward, every gradient
against nn.RNN; a candidate that fails is reported as a parity FAILURE and not timed), then

* CUDA: forward and forward+backward times (`triton.testing.do_bench`, median, CUDA events), ratio
  cuDNN / ours (the kernels pinned, `backend='triton'`) and cuDNN / `backend='auto'` (as users get it),
  peak memory, TFLOP/s, time per sequential step against an empty persistent loop's;
* CPU: `backend='auto'` as users get it (nn's ATen kernel or our pure-PyTorch path, whichever
  `fused_birnn.tune` measured faster for the call shape) against nn.RNN on the same CPU, wall-clock medians,
  ours and nn.RNN interleaved round by round; the Triton kernels through the interpreter for the parity
  gate only (the command re-executes itself with `TRITON_INTERPRET=1` so that they can run);

each ratio (> 1: ours faster) measured until its bootstrap 95% interval lies within ±5% of it
(`timing.StopRule`, capped in rounds and seconds; what stops at a cap is flagged "did not converge"), and
what `auto` ran for each mode (`auto runs`); then the compile table of every configuration's kernels
(`fused_birnn.compile_report`). Writes `<suite>.json` (raw), `<suite>.md` (table) and PNG plots (with the
`[bench]` extra, matplotlib) under `--out` (default: a new `fused_birnn-results/<cpu|gpu>-<date>-<time>/`
under the current folder), each stamped with the
machine, driver, torch, triton, CUDA, cuDNN, allow_tf32 (GPU runs) and the date.

Library use (tests): `run_suite(name, out_dir, Options(device="cpu", candidate_factory=...))`.
"""

from .parity import check_parity, scaled_error
from .runner import Options, default_candidate, run_config, run_suite
from .suites import ALL, SUITES, Config, get_suite

__all__ = ["ALL", "SUITES", "Config", "Options", "check_parity", "default_candidate", "get_suite", "run_config",
           "run_suite", "scaled_error"]
