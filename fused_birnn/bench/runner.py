"""Run a suite: for every configuration, the parity gate, then the timings of the candidates that passed.

The candidate is `fused_birnn.RNN`, `LSTM` or `GRU` (`Config.cell`), the reference `torch.nn`'s class of
the same name, built with the same arguments and loaded with the reference's state dict.

CUDA: the candidate (the Triton kernels) against the `torch.nn` module (cuDNN), forward and
forward+backward, timed with `triton.testing.do_bench` (median), with peak memory, achieved TFLOP/s and
the time per sequential step against an empty persistent loop's (`floor.py`); `backend='auto'` as users
get it is timed in the same windows beside them.

CPU: the candidate with `backend='auto'`, deciding as it does without the interpreter (nn's ATen kernel or
our PyTorch path, measured per call shape by `fused_birnn.tune`: README), against the `torch.nn`
module on the same CPU (wall-clock medians, the two interleaved in ABBA order: `timing.cpu_compare_ms`).
The PyTorch path (`backend='torch'`) and, when the process runs the Triton interpreter
(`TRITON_INTERPRET=1` before `fused_birnn` was imported; the command line arranges it), the kernels
(`backend='triton'`) pass the same parity gate, untimed.

Every configuration's kernels are also compiled for sm_80 and sm_90 (`fused_birnn.compile_report`).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import report
from .parity import (CandidateFactory, check_parity, make_reference, module_kwargs, reference_name, summarize,
                     wrap_packed)
from .suites import Config, get_suite
from .timing import (OthersLoad, Rotating, StopRule, clear_grads, cpu_compare_ms, cuda_peak_memory, cuda_time_ms,
                     cuda_times_ms, forward_backward_fn, forward_fn, grad_leaves, ratio_interval, ratio_summary)

CPU_ATTEMPTS = 3  # measurements of a CPU mode while other processes keep taking CPU time
CPU_RETRY_SLEEP_S = 5.0
CPU_BUSY_LIMIT_PCT = 10.0  # other processes' share of the CPUs above which a CPU timing counts as disturbed
TIMED_MODES = (("fwd", forward_fn), ("fwd_bwd", forward_backward_fn))
MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
# how long a ratio is measured (timing.StopRule): until its bootstrap 95% interval is within ±5%, with caps
CPU_RULE = StopRule(bound=0.05, min_runs=11, max_runs=5000, min_time_s=1.0, max_time_s=20.0)
CPU_QUICK_RULE = StopRule(bound=0.05, min_runs=4, max_runs=10, min_time_s=0.05, max_time_s=2.0, check_every=1)
CUDA_MAX_WINDOWS, CUDA_QUICK_MAX_WINDOWS = 4, 2  # do_bench windows per candidate and mode, at most
COMPILE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def default_candidate(cfg: Config, backend: str, device: torch.device) -> nn.Module:
    """`fused_birnn.RNN` / `LSTM` / `GRU` (`cfg.cell`) for `cfg` on `backend`, built with the same arguments
    as the `torch.nn` reference (`parity.module_kwargs`), random init (the caller loads the reference's
    state dict into it)."""
    import fused_birnn

    cls = getattr(fused_birnn, cfg.cell, None)
    if cls is None:
        raise NotImplementedError(f"this fused_birnn ({fused_birnn.__file__}) has no {cfg.cell} class")
    return wrap_packed(cls(cfg.input_size, cfg.hidden_size, cfg.num_layers, **module_kwargs(cfg), device=device,
                           dtype=cfg.torch_dtype, backend=backend), cfg)


@dataclass
class Options:
    """How to run a suite.

    Attributes:
        device: "cuda" or "cpu".
        quick: shorter timings (and the suites' quick shapes, chosen by the caller).
        compile: attach `fused_birnn.compile_report` rows (sm_80, sm_90) to every configuration.
        compile_jobs: parallel compiles.
        plots: write the PNGs.
        candidate_factory: builds the candidate module `(cfg, backend, device) -> nn.Module`; it must have
            nn.RNN's parameter names (the runner loads nn.RNN's state dict into it). Tests inject a wrong one.
        seed: weights and parity inputs.
        progress: progress bars (on a terminal) and one line per configuration, on stderr.
        interpreter_max_steps: CPU only: the untimed interpreter parity gate of the Triton kernels runs at
            most this many time steps (same H, B, layers, dtype; 0: the configuration's T).
    """

    device: str = "cpu"
    quick: bool = False
    compile: bool = True
    compile_jobs: int = 2
    plots: bool = True
    candidate_factory: CandidateFactory | None = None
    seed: int = 0
    progress: bool = True
    interpreter_max_steps: int = 8


def _interpreter() -> bool:
    from fused_birnn.functional import INTERPRETER

    return INTERPRETER


def _candidates(device: str) -> list[tuple[str, str, bool]]:
    """(name, backend, timed) of each candidate on this device. On CUDA the kernels (`backend='triton'`,
    "ours": the ratio and its interval) and `backend='auto'` as users get it (timed in the same windows).
    On a CPU the timed one is what a user gets, `backend='auto'` as in a process without the interpreter
    (`_as_installed`); the PyTorch path and, under the interpreter, the kernels pass the parity gate
    untimed."""
    if device == "cuda":  # the kernels pinned, and `auto` as users get it (fused_birnn.tune's choice)
        return [("ours", "triton", True), ("auto", "auto", True)]
    cands = [("ours", "auto", True), ("torch", "torch", False)]
    if _interpreter():
        cands.append(("triton", "triton", False))  # the kernels, interpreted: parity only
    return cands


@contextlib.contextmanager
def _as_installed(backend: str):
    """While a CPU candidate with `backend='auto'` is gated and timed: `auto` decides as in a process
    without TRITON_INTERPRET (this command runs interpreted for the kernels' parity gate, and `auto`
    reads `fused_birnn.functional.INTERPRETER` per call), so the figures are what users get."""
    from fused_birnn import functional

    saved = functional.INTERPRETER
    functional.INTERPRETER = functional.INTERPRETER and backend != "auto"
    try:
        yield
    finally:
        functional.INTERPRETER = saved


def _interp_label(name: str, parity: dict, cfg: Config) -> str:
    return f"{name} (interpreter" + (f", T={parity['seq_len']})" if parity["seq_len"] != cfg.seq_len else ")")


def _timing_entry(ours: dict | None, ref: dict | None, flops: int | None, ratio: dict | None = None) -> dict:
    """One mode's timings; `ratio` (timing.ratio_summary) adds the ratio, its 95% interval, `converged`."""
    e: dict = {"ours_ms": ours and ours["ms"], "ref_ms": ref and ref["ms"], "ratio": None}
    if ours and ref:
        e["ratio"] = ref["ms"] / ours["ms"]
    if ratio is not None:
        e["ratio"] = ratio["ratio"]
        e["ratio_ci95"], e["ratio_rel_halfwidth"] = ratio["ci95"], ratio["rel_halfwidth"]
        e.update({k: v for k, v in ratio.items() if k not in ("ratio", "ci95", "rel_halfwidth")})
    for who, t in (("ours", ours), ("ref", ref)):
        if t is None:
            continue
        if flops is not None:
            e[f"{who}_tflops"] = flops / t["ms"] / 1e9
        for k, v in t.items():
            if k != "ms":
                e[f"{who}_{k}"] = v
    return e


def auto_runs(cfg: Config, model: nn.Module | None, device: torch.device) -> dict:
    """What `backend='auto'` (`model`, or the module it wraps) ran for each timed mode: `fused_birnn.tune`'s
    decision for the configuration's call shape ("aten": nn's own kernel, cuDNN on CUDA), its ranking and
    the probe times it measured (ms), or the default it runs unmeasured (`FUSED_BIRNN_AUTOTUNE=0`)."""
    from fused_birnn import tune

    if model is None:
        return {}
    rnn = getattr(model, "rnn", model)
    x = torch.empty(0, dtype=cfg.torch_dtype, device=device)  # what the key reads of the input: dtype, device
    out = {}
    rows = "packed" if cfg.packed else ""
    for mode, grad in (("fwd", False), ("fwd_bwd", True)):
        d = tune.decision_for(rnn, x, cfg.seq_len, cfg.batch, rows, grad)
        if d is None:
            key = tune.key_of(rnn, x, cfg.seq_len, cfg.batch, rows, grad)
            out[mode] = {"runs": tune.default_choice(key, cfg.seq_len), "measured": False}
        else:
            out[mode] = {"runs": d.choice, "measured": True, "ranking": d.ranking, "probe_ms": d.times_ms,
                         "rejected": d.rejected, "estimates_ms": d.estimates_ms}
    return out


def _time_cuda(cfg: Config, ours: nn.Module, ref: nn.Module | None, modes: list[str], opts: Options,
               floors: dict[int, float], auto: nn.Module | None = None) -> dict:
    """CUDA timings of `ours` against `ref` (the ratio, its interval), and of `auto` (`backend='auto'`,
    timed in the same windows: `auto_ms`, `auto_ratio` = ref / auto, a ratio of medians) where given."""
    from .floor import floor_fn

    warmup, rep = (5, 20) if opts.quick else (25, 100)
    max_windows = CUDA_QUICK_MAX_WINDOWS if opts.quick else CUDA_MAX_WINDOWS
    bound = (CPU_QUICK_RULE if opts.quick else CPU_RULE).bound
    inputs = Rotating(cfg, ours_device(ours))
    out: dict = {}
    fwd_flops = cfg.forward_flops()
    for mode, builder in TIMED_MODES:
        if mode not in modes:
            continue
        models = {who: m for who, m in (("ours", ours), ("ref", ref), ("auto", auto)) if m is not None}
        fns = {who: builder(m, inputs.cursor()) for who, m in models.items()}
        leaves = {who: (grad_leaves(m, inputs) if mode == "fwd_bwd" else []) for who, m in models.items()}
        # do_bench windows, ours and the reference alternately, until the ratio of the medians has its
        # bootstrap 95% interval within the bound (CUDA timings are steady: usually after the first)
        times: dict[str, list[float]] = {who: [] for who in fns}
        ratio, windows = None, 0
        while True:
            for who, fn in fns.items():
                times[who] += cuda_times_ms(fn, grad_to_none=leaves[who] or None, warmup_ms=warmup, rep_ms=rep)
            windows += 1
            if "ref" not in fns:
                break
            interval = ratio_interval(times["ref"], times["ours"], paired=False)
            ratio = ratio_summary(interval, bound, stop="converged", rounds=windows)
            if ratio["converged"] or windows >= max_windows:
                ratio["stop"] = "converged" if ratio["converged"] else "max_runs"
                break
        measured = {}
        for who, model in (("ours", ours), ("ref", ref)):
            if who not in fns:
                measured[who] = None
                continue
            mem = cuda_peak_memory(fns[who], grad_to_none=leaves[who])
            measured[who] = {"ms": statistics.median(times[who]), "samples": len(times[who]),
                             "peak_mib": mem["peak_extra_bytes"] / 2**20,
                             "peak_total_mib": mem["peak_bytes"] / 2**20}
        out[mode] = _timing_entry(measured["ours"], measured["ref"], fwd_flops * (3 if mode == "fwd_bwd" else 1),
                                  ratio)
        if "auto" in times:
            out[mode]["auto_ms"] = statistics.median(times["auto"])
            out[mode]["auto_ratio"] = measured["ref"]["ms"] / out[mode]["auto_ms"] if measured["ref"] else None
    T, L = cfg.seq_len, cfg.num_layers
    if T not in floors:
        floors[T] = cuda_time_ms(floor_fn(T), warmup_ms=warmup, rep_ms=rep)
    step: dict = {"floor_us": floors[T] * 1e3 / T, "floor_ms": floors[T]}
    for mode, steps in (("fwd", L * T), ("fwd_bwd", 2 * L * T)):
        e = out.get(mode) or {}
        for who in ("ours", "ref"):
            if e.get(f"{who}_ms") is not None:
                step[f"{who}_{mode}_us"] = e[f"{who}_ms"] * 1e3 / steps
    if step.get("ours_fwd_us") is not None:
        step["ours_fwd_over_floor"] = step["ours_fwd_us"] / step["floor_us"]
    out["per_step"] = step
    return out


def ours_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _time_cpu(cfg: Config, ours: nn.Module, ref: nn.Module | None, modes: list[str], opts: Options) -> dict:
    inputs = Rotating(cfg, "cpu")
    warmup, rule = (1, CPU_QUICK_RULE) if opts.quick else (3, CPU_RULE)
    out: dict = {}
    for mode, builder in TIMED_MODES:
        if mode not in modes:
            continue
        models = {"ours": ours, "ref": ref}
        # one input cursor each: round i gives both the same input set (cpu_compare_ms flips their order)
        fns = {who: builder(m, inputs.cursor()) for who, m in models.items() if m is not None}
        resets: dict[str, Callable[[], None]] = {}
        if mode == "fwd_bwd":
            for who, m in models.items():
                if m is not None:
                    leaves = grad_leaves(m, inputs)
                    resets[who] = lambda leaves=leaves: clear_grads(leaves)
        # a shared CPU: measure what other processes used meanwhile; retry a disturbed measurement, keep the
        # least disturbed one (small ops under OpenMP slow down 10-100x when another process takes a core)
        attempts = []
        for attempt in range(1 if opts.quick else CPU_ATTEMPTS):
            if attempt:
                time.sleep(CPU_RETRY_SLEEP_S)
            load = OthersLoad().start()
            t = cpu_compare_ms(fns, resets=resets, warmup=warmup, rule=rule, pair=("ref", "ours"))
            attempts.append((load.stop(), t))
            if attempts[-1][0] is None or attempts[-1][0] <= CPU_BUSY_LIMIT_PCT:
                break
        others, t = min(attempts, key=lambda a: a[0] if a[0] is not None else 0.0)
        conv = {who: {"ms": v["median_ms"], "min_ms": v["min_ms"], "iqr_ms": v["iqr_ms"], "runs": v["runs"],
                      "times_ms": [round(x, 4) for x in v["times_ms"]]}
                for who, v in t["times"].items()}
        e = _timing_entry(conv.get("ours"), conv.get("ref"), None, t["ratio"])
        if t["ratio"] is not None:
            e["ratio_of_medians"] = conv["ref"]["ms"] / conv["ours"]["ms"]
        e["others_cpu_pct"] = others
        e["attempts"] = len(attempts)
        e["noisy"] = others is not None and others > CPU_BUSY_LIMIT_PCT
        out[mode] = e
    return out


def run_config(cfg: Config, opts: Options, floors: dict[int, float] | None = None) -> dict:
    """Parity gate, then timings, of one configuration. Never raises: errors become the status."""
    device = torch.device(opts.device)
    factory = opts.candidate_factory or default_candidate
    res: dict = {"config": cfg.to_dict(), "label": cfg.label, "flops_fwd": cfg.forward_flops(),
                 "parity": {}, "fwd": None, "fwd_bwd": None, "per_step": None,
                 "status": "ok", "status_text": "ok", "notes": []}
    try:
        torch.manual_seed(opts.seed)
        ref: nn.Module | None = make_reference(cfg, device)
        timed_models: dict[str, nn.Module] = {}
        for name, backend, timed in _candidates(opts.device):
            gate_cfg, gate_ref = cfg, ref
            if not timed and opts.interpreter_max_steps and cfg.seq_len > opts.interpreter_max_steps:
                # the interpreter is slow (minutes for a streamed H=256 layer at T=64); the kernels take T
                # as a runtime argument, so fewer steps run exactly the same code (same H, B, dtype, config)
                gate_cfg = replace(cfg, seq_len=opts.interpreter_max_steps)
                if cfg.packed:  # lengths follow the shorter T
                    gate_ref = wrap_packed(ref.rnn, gate_cfg)
            cand = factory(gate_cfg, backend, device)
            cand.load_state_dict(ref.state_dict())
            with _as_installed(backend):
                p = check_parity(gate_cfg, cand, gate_ref, device, seed=opts.seed)
            p["backend"] = backend
            p["seq_len"] = gate_cfg.seq_len
            res["parity"][name] = p
            if timed:
                timed_models[name] = cand
            else:
                del cand
        ours_timed = timed_models["ours"]
        auto = timed_models.get("auto")
        if auto is not None and not (res["parity"]["auto"]["fwd_ok"] and res["parity"]["auto"]["bwd_ok"]):
            auto = None  # what fails the gate is not timed
        main = res["parity"]["ours"]
        if main.get("reference_error"):
            ref = None
            res["status"] = "cudnn_unsupported" if opts.device == "cuda" else "reference_unsupported"
            res["notes"].append(f"{reference_name(cfg)} raised: {main['reference_error'][:200]}")
        modes = []
        if main["fwd_ok"]:
            modes.append("fwd")
        if main["bwd_ok"]:
            modes.append("fwd_bwd")
        failed = [n for n, p in res["parity"].items() if not (p["fwd_ok"] and p["bwd_ok"])]
        if failed:
            res["status"] = "parity_failure"
        if len(res["parity"]) == 1:
            res["status_text"] = summarize(main)
        else:  # CPU: "auto: ok, torch: ok, triton (interpreter): ok"
            res["status_text"] = ", ".join(
                f"{p['backend'] if p['backend'] != 'triton' else _interp_label(n, p, cfg)}: {summarize(p)}"
                for n, p in res["parity"].items())
        if res["status"] == "cudnn_unsupported":
            res["status_text"] = "cuDNN unsupported; " + res["status_text"] + " (vs float64)"
        elif res["status"] == "reference_unsupported":
            res["status_text"] = f"{reference_name(cfg)} unsupported; " + res["status_text"] + " (vs float64)"
        if modes:
            if opts.device == "cuda":
                res.update(_time_cuda(cfg, ours_timed, ref, modes, opts, floors if floors is not None else {},
                                      auto=auto))
            else:
                with _as_installed("auto"):
                    res.update(_time_cpu(cfg, ours_timed, ref, modes, opts))
                noisy = [m for m in modes if (res.get(m) or {}).get("noisy")]
                if noisy:
                    worst = max(res[m]["others_cpu_pct"] for m in noisy)
                    res["notes"].append(f"CPU timing disturbed: other processes used {worst:.0f}% of the CPUs")
                    res["status_text"] += f" [noisy CPU: others {worst:.0f}%]"
            res["auto_runs"] = auto_runs(cfg, auto if opts.device == "cuda" else ours_timed, device)
            for m in modes:
                e = res.get(m) or {}
                if e.get("converged") is False:
                    res["notes"].append(f"{MODE_NAMES[m]} ratio did not converge: 95% interval "
                                        f"±{e['ratio_rel_halfwidth']:.0%} after {e['rounds']} rounds ({e['stop']})")
    except Exception as e:  # noqa: BLE001 - one bad configuration must not end the run
        res["status"] = "error"
        res["status_text"] = f"ERROR {type(e).__name__}: {str(e)[:80]}"
        res["traceback"] = traceback.format_exc()
    finally:
        gc.collect()
        if opts.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------ compile report
def _compile_case_fields() -> set[str]:
    try:
        import dataclasses

        from fused_birnn.compile_report import CompileCase
    except ImportError:
        return set()
    return {f.name for f in dataclasses.fields(CompileCase)}


def compile_cases(configs: list[Config], allow_tf32: bool) -> dict[tuple, dict]:
    """The distinct recurrence compiles of `configs` (every layer of a configuration launches the same
    forward and backward kernel): key -> `fused_birnn.compile_report.CompileCase` fields. LSTM and GRU
    configurations pass `cell` ("LSTM" / "GRU") and `proj_size` (LSTM with a projection), and are left
    out where `CompileCase` has no such field."""
    fields = _compile_case_fields()
    cases = {}
    for c in configs:
        if c.dtype not in COMPILE_DTYPES:
            continue
        extra: dict = {}
        if c.cell != "RNN":
            if "cell" not in fields or (c.proj_size and "proj_size" not in fields):
                continue  # this compile_report cannot compile the cell yet
            extra["cell"] = c.cell
            if c.proj_size:
                extra["proj_size"] = c.proj_size
        prec = "tf32" if c.dtype == "fp32" and allow_tf32 else "ieee"
        key = (c.hidden_size, c.batch, COMPILE_DTYPES[c.dtype], prec, c.nonlinearity == "relu", c.packed,
               c.cell.lower() if c.cell != "RNN" else "rnn", c.proj_size)
        cases[key] = dict(hidden_size=c.hidden_size, batch_size=c.batch, dtype=COMPILE_DTYPES[c.dtype],
                          input_precision=prec, relu=c.nonlinearity == "relu", lengths=c.packed, **extra)
    return cases


def _case_key(row: dict) -> tuple:
    cell = str(row.get("cell") or "rnn").lower()  # compile_report's rows: "RNN_TANH", "RNN_RELU", "LSTM", "GRU"
    return (row["hidden_size"], row["batch_size"], row["dtype"], row["input_precision"], row["relu"],
            row.get("lengths", False), cell if cell in ("lstm", "gru") else "rnn", row.get("proj_size") or 0)


def _not_compiled_reason(cfg: Config) -> str:
    if cfg.dtype not in COMPILE_DTYPES:
        return f"no kernels for {cfg.dtype}"
    return (f"fused_birnn.compile_report cannot compile the {cfg.cell} cell yet (its CompileCase has no "
            f"'cell'{' or proj_size' if cfg.proj_size else ''} field)")


def attach_compile_report(results: list[dict], allow_tf32: bool, jobs: int) -> str | None:
    """Compile every configuration's kernels for sm_80 and sm_90 and attach the rows to the results
    (`result["compile"]`). Returns None, or why it could not run."""
    try:
        from fused_birnn.compile_report import compile_report
    except ImportError as e:  # integration point: the module is another helper's
        return f"fused_birnn.compile_report is not importable ({e})"
    configs = [Config(**r["config"]) for r in results]
    cases = compile_cases(configs, allow_tf32)
    for r, c in zip(results, configs):
        if not compile_cases([c], allow_tf32):
            r["compile"], r["compile_note"] = [], _not_compiled_reason(c)
    if not cases:
        return "; ".join(dict.fromkeys(r["compile_note"] for r in results)) or "no configuration"
    try:
        rows = compile_report(list(cases.values()), jobs=jobs)
    except Exception as e:  # noqa: BLE001 - a crashed compiler subprocess must not lose the timings
        return f"{type(e).__name__}: {str(e)[:500]}"
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault(_case_key(row), []).append(row)
    for r, c in zip(results, configs):
        keys = list(compile_cases([c], allow_tf32))
        r["compile"] = by_key.get(keys[0], []) if keys else []
    return None


# ------------------------------------------------------------------------------------------ suites
def file_stem(suite: str, dtypes: tuple[str, ...] | None, quick: bool) -> str:
    return suite + (f"_{'-'.join(dtypes)}" if dtypes else "") + ("_quick" if quick else "")


def not_converged(results: list[dict]) -> list[str]:
    """'<label> <mode>' of every timed ratio whose 95% interval stayed wider than the bound."""
    return [f"{r['label']} {MODE_NAMES[m]}" for r in results for m in ("fwd", "fwd_bwd")
            if (r.get(m) or {}).get("converged") is False]


def _compile_step(payload: dict, suite: str, opts: Options, allow_tf32: bool) -> None:
    """The compile table, with a progress bar that reaches its end and a line saying how it went."""
    n = len(compile_cases([Config(**r["config"]) for r in payload["results"]], allow_tf32))
    what = f"compile {suite}: {n} configuration(s), forward + backward kernels for each GPU target"
    bar = report.progress(1, what, enabled=opts.progress)
    if opts.progress and bar.disable:  # no terminal: a line says what the next minute(s) are spent on
        report.progress_line(what + " ...")
    payload["compile_allow_tf32"] = allow_tf32
    payload["compile_error"] = attach_compile_report(payload["results"], allow_tf32, opts.compile_jobs)
    bar.update(1)
    bar.close()
    payload["compile_summary"] = report.compile_summary(payload)  # the command prints it


def run_suite(suite: str, out_dir: Path | str, opts: Options, *, dtypes: tuple[str, ...] | None = None,
              compile_only: bool = False, configs: list[Config] | None = None,
              sizing: str | None = None) -> dict:
    """Run `suite` and write `<stem>.json`, `<stem>.md` and the PNGs under `out_dir` (the JSON after
    every configuration, so an interrupted run keeps what it measured). `sizing` picks the GPU ("cuda")
    or CPU ("cpu") shapes; default: the device's. Returns the JSON payload."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizing = sizing or opts.device
    configs = configs if configs is not None else get_suite(suite, sizing, quick=opts.quick, dtypes=dtypes)
    with _interrupts_deferred() as early:  # a Ctrl-C here still leaves this suite's (empty) files behind
        env = report.environment(opts.device if not compile_only else sizing)
    # the GPU kernels' fp32 dot follows cuDNN's TF32 switch: compile what a GPU run would launch
    allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    stem = file_stem(suite, dtypes, opts.quick) + ("_compile" if compile_only else "")
    rule = CPU_QUICK_RULE if opts.quick else CPU_RULE
    payload: dict = {"suite": suite, "quick": opts.quick, "compile_only": compile_only, "sizing": sizing,
                     "env": env, "partial": True, "results": [], "compile_error": None,
                     "flops_formula": "forward: 2*T*B*G*H*(I_l + P) per direction per layer, + 2*T*B*H*P with "
                                      "a projection (G = 1 RNN, 4 LSTM, 3 GRU; P = proj_size or H; I_l = I for "
                                      "layer 0, 2P above); forward+backward: 3x forward",
                     "reference": report.suite_reference(configs),
                     "ratio_definition": report.ratio_definition(env["device"], report.suite_reference(configs)),
                     "noise_rule": dict(vars(rule), confidence=0.95,
                                        text=rule.describe() if env["device"] == "cpu" else
                                        f"do_bench windows until the bootstrap 95% interval of the ratio of "
                                        f"medians lies within ±{rule.bound:.0%} (at most "
                                        f"{CUDA_QUICK_MAX_WINDOWS if opts.quick else CUDA_MAX_WINDOWS} windows)")}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    t0 = time.perf_counter()

    if early:
        payload["interrupted"] = f"after 0 of {len(configs)} configurations"
    elif compile_only:
        payload["results"] = [{"config": c.to_dict(), "label": c.label} for c in configs]
        _compile_step(payload, suite, opts, allow_tf32)
    else:
        bar = report.progress(len(configs), suite, enabled=opts.progress)
        floors: dict[int, float] = {}
        try:
            for i, cfg in enumerate(configs):
                bar.set_description_str(report.fit_words(f"{suite}: {cfg.label}", report.desc_width()))
                payload["results"].append(run_config(cfg, opts, floors))
                payload["not_converged"] = not_converged(payload["results"])
                report.write_json(json_path, payload)
                bar.update(1)
                if opts.progress:
                    report.progress_line(f"[{suite} {i + 1}/{len(configs)}] "
                                         + report.result_line(payload["results"][-1]), bar)
        except KeyboardInterrupt:  # `timeout --signal=INT`: keep what was measured, write the reports
            payload["interrupted"] = f"after {len(payload['results'])} of {len(configs)} configurations"
        bar.set_description_str(suite)
        bar.close()
        if opts.compile and not payload.get("interrupted"):
            try:
                _compile_step(payload, suite, opts, allow_tf32)
            except KeyboardInterrupt:
                payload["interrupted"] = "during the compile table"
    with _interrupts_deferred() as late:  # the files are written whole; a Ctrl-C now stops what follows
        _write_reports(payload, out_dir, json_path, md_path, compile_only, opts, t0, stem)
    if late and not payload.get("interrupted"):
        payload["interrupted"] = "while its reports were written (all configurations measured)"
    return payload


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT (Ctrl-C, `timeout --signal=INT`) is remembered, not raised, inside the block: yields a list
    that is non-empty if one came. Only where Python delivers signals (the main thread)."""
    got: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(True))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_reports(payload: dict, out_dir: Path, json_path: Path, md_path: Path, compile_only: bool,
                   opts: Options, t0: float, stem: str) -> None:
    """The suite's final JSON, markdown and plots; `payload["files"]` lists them."""
    env, suite = payload["env"], payload["suite"]
    payload["not_converged"] = [] if compile_only else not_converged(payload["results"])
    payload["partial"] = False
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    if env["device"] == "cpu" and not compile_only:
        env["cpu_busy_by_others_pct_at_end"] = report.cpu_busy_pct()
    report.write_json(json_path, payload)
    if compile_only:
        md = [f"# Compiled kernels of suite `{suite}` (sm_80, sm_90)", "", f"**{report.stamp_line(env)}**", "",
              "Configurations:", ""]
        md += [f"- {line}" for line in report.compile_config_lines(payload["results"])] + [""]
        rows = report.compile_rows(payload["results"])
        md.append(report.markdown_table(report.compile_columns(), rows) if rows
                  else f"not available: {payload['compile_error']}")
        md_path.write_text("\n".join(md) + "\n")
    else:
        md_path.write_text(report.markdown_report(payload))
        if opts.plots and payload["results"]:
            try:
                payload["plots"] = [p.name for p in report.write_plots(payload, out_dir, stem)]
            except ImportError as e:  # matplotlib is the [bench] extra: keep the JSON and the table
                payload["plots_error"] = f"no plots: {e} (pip install 'fused_birnn[bench]')"
            except Exception as e:  # noqa: BLE001 - a plotting bug must not lose the measurements
                payload["plots_error"] = f"no plots: {type(e).__name__}: {e}"
            report.write_json(json_path, payload)
    payload["files"] = [str(json_path), str(md_path)] + [str(out_dir / p) for p in payload.get("plots", [])]
