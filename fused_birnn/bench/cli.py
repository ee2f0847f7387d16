"""`python -m fused_birnn.bench`: the comparison command (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from . import report
from .runner import Options, run_suite
from .suites import DTYPES, GROUPS, SUITES

_CHILD = "_FUSED_BIRNN_BENCH_CHILD"  # set in a re-executed child: never re-execute twice
DEVICE_DIRS = {"cuda": "gpu", "cpu": "cpu"}
RESULTS_ROOT = "fused_birnn-results"


def default_out(kind: str, root: Path | str = RESULTS_ROOT, now: datetime.datetime | None = None) -> Path:
    """A folder no earlier run used: `<root>/<kind>-<YYYYmmdd-HHMMSS>[-N]` (created by the caller)."""
    base = Path(root) / f"{kind}-{(now or datetime.datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 2
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def interpreter_numpy_problem() -> str | None:
    """triton 3.6's interpreter fails on a runtime loop bound with numpy >= 2.4 (NOTES-triton 8d): say so
    before the parity gate of the kernels fails with an obscure error."""
    import numpy
    import triton

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"WARNING: triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                "(it needs numpy < 2.4): the interpreter parity gate of the Triton kernels will fail; "
                "pip install 'numpy<2.4'")
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fused_birnn.bench",
        description="Compare fused_birnn.RNN / LSTM / GRU with torch.nn.RNN / LSTM / GRU (cuDNN on CUDA): "
                    "parity gate, then timings.")
    ap.add_argument("--suite", nargs="+", required=True, metavar="NAME",
                    help=f"one or more of {', '.join(SUITES)}, or a group: "
                         + "; ".join(f"'{g}' ({', '.join(names)})" for g, names in GROUPS.items()))
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda if available, else cpu (--compile-only: GPU shapes unless 'cpu')")
    ap.add_argument("--out", default=None,
                    help=f"output folder (default: a new {RESULTS_ROOT}/<cpu|gpu>-<date>-<time>/ under the current "
                         "folder, so that no earlier results are overwritten)")
    ap.add_argument("--quick", action="store_true", help="shrunken suites and short timings (smoke runs)")
    ap.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=None,
                    help="only these dtypes (default: fp32 fp16 bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the sm_80/sm_90 compile table of the suite's kernels (works without a GPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile table in a timing run")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="parallel compiles for the compile table")
    ap.add_argument("--no-plots", action="store_true",
                    help="write no PNG plots, only <suite>.json and <suite>.md (plots need matplotlib: "
                         "pip install 'fused_birnn[bench]')")
    ap.add_argument("--seed", type=int, default=0,
                    help="random seed of the weights and of the parity-gate inputs (default 0); the timed inputs "
                         "are fixed")
    ap.add_argument("--interpreter-steps", type=int, default=8,
                    help="CPU: time steps of the (untimed) interpreter parity gate of the Triton kernels; "
                         "0 = each configuration's own T (slow: minutes for H=256 fp32)")
    return ap


def expand_suites(names: Sequence[str]) -> list[str]:
    """Suite names with each group (`all`, `rnn`, `lstm-gru`) replaced by its suites, each suite once, in
    order; ValueError for an unknown name."""
    suites: list[str] = []
    for s in names:
        for name in GROUPS.get(s, (s,)):
            if name not in SUITES:
                raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)} or a group "
                                 f"({', '.join(GROUPS)})")
            if name not in suites:
                suites.append(name)
    return suites


def _reexec(interpret: str) -> int:
    """Run this command again in a fresh process with TRITON_INTERPRET=`interpret` (it is read when
    fused_birnn.kernels is imported, which `python -m fused_birnn.bench` has already done)."""
    env = dict(os.environ, TRITON_INTERPRET=interpret, **{_CHILD: "1"})
    child = subprocess.Popen([sys.executable, "-m", "fused_birnn.bench", *sys.argv[1:]], env=env)
    # Ctrl-C or `timeout --signal=INT` reach the child with this process's group: it writes what it measured
    # (run_suite keeps a suite's finished configurations); this process waits for that instead of killing it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from fused_birnn.functional import INTERPRETER

    try:
        suites = expand_suites(args.suite)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.compile_only:
        device = args.device or "cuda"
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device here (use --device cpu or --compile-only)", file=sys.stderr)
            return 2
        # CPU: the Triton kernels must run interpreted for their parity gate; CUDA: compiled.
        want = "1" if device == "cpu" else "0"
        if argv is None and os.environ.get(_CHILD) != "1" and INTERPRETER != (want == "1"):
            return _reexec(want)
    out = Path(args.out) if args.out else default_out("compile" if args.compile_only else DEVICE_DIRS[device])
    print(f"results go to {out.resolve()}" + ("" if args.out else " (--out DIR to choose)"), flush=True)
    if device == "cpu" and INTERPRETER and not args.compile_only:
        problem = interpreter_numpy_problem()
        if problem:
            print(problem, file=sys.stderr)
    opts = Options(device=device if not args.compile_only else "cpu", quick=args.quick,
                   compile=not args.no_compile, compile_jobs=args.jobs, plots=not args.no_plots, seed=args.seed,
                   interpreter_max_steps=args.interpreter_steps)
    dtypes = tuple(args.dtype) if args.dtype else None
    try:
        return _run_suites(suites, out, opts, dtypes, args, device)
    except KeyboardInterrupt:  # between suites: each finished suite's files are complete
        print("interrupted", file=sys.stderr)
        return 130


def _run_suites(suites: list[str], out: Path, opts: Options, dtypes, args, device: str) -> int:
    for suite in suites:
        payload = run_suite(suite, out, opts, dtypes=dtypes, compile_only=args.compile_only, sizing=device)
        print(f"\n== suite {suite}{' (quick)' if args.quick else ''}: {report.stamp_line(payload['env'])}")
        if args.compile_only:
            from fused_birnn.compile_report import format_table

            for line in report.compile_config_lines(payload["results"]):
                print("  " + line)
            rows = [c for r in payload["results"] for c in (r.get("compile") or [])]
            print(format_table(rows) if rows else f"compile table not available: {payload['compile_error']}")
        else:
            head = report.result_columns(device, report.reference_of(payload))
            print(report.text_table(head, [report.result_row(r, device) for r in payload["results"]]))
            for line in report.ratio_legend(payload):
                print(line)
            if payload.get("compile_summary"):
                print(payload["compile_summary"])
        if payload.get("plots_error"):
            print(payload["plots_error"], file=sys.stderr)
        for line in report.run_warnings(payload):
            print(line, file=sys.stderr)
        print("wrote " + ", ".join(payload["files"]))
        if payload.get("interrupted"):  # Ctrl-C / timeout: what was measured is written; run nothing more
            rest = suites[suites.index(suite) + 1:]
            if rest:
                print(f"interrupted: not run: {', '.join(rest)}", file=sys.stderr)
            return 130
    return 0
