"""What a benchmark run writes: the machine stamp, a progress bar, the text and markdown tables, the raw
JSON and the PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..tune import cpu_model

SM_COUNT = {"sm_90": 132, "sm_80": 108, "sm_89": 142}  # the SMs the estimates assume (kernels.config.TYPICAL_SMS)
SM_GPU = {"sm_90": "H100 SXM", "sm_80": "A100", "sm_89": "L40"}


# ------------------------------------------------------------------------------------------ stamp
def _driver() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "n/a"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "n/a"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "n/a"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "n/a"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def cpu_busy_pct(seconds: float = 1.0) -> float | None:
    """Percentage of all CPUs busy during `seconds` while this process sleeps: other processes' load.
    CPU timings are only meaningful near 0 (small PyTorch ops under OpenMP slow down 10-100x when a core is
    taken by someone else)."""
    import time

    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * (1 - (i1 - i0) / max(t1 - t0, 1)), 1)


def environment(device: str) -> dict:
    """Everything a result depends on that is not in the configuration."""
    import triton

    import fused_birnn
    from fused_birnn.functional import INTERPRETER

    env = {
        "device": device,
        "machine": "",
        "gpu_name": "n/a",
        "cpu_model": cpu_model(),
        "driver": _driver(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "n/a",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a",
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_busy_by_others_pct_at_start": cpu_busy_pct() if device == "cpu" else None,
        "triton_interpret": INTERPRETER,
        "python": platform.python_version(),
        "fused_birnn": fused_birnn.__version__,
        "git": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":  # TF32 switches mean nothing on a CPU run: stamped on GPU runs only
        env["allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        env["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"sm_{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
        env["machine"] = f"GPU {props.name}"
    else:
        env["machine"] = f"CPU {env['cpu_model']} ({env['cpu_threads']} threads)"
    return env


def stamp_line(env: dict) -> str:
    tf32 = f"allow_tf32 {env['allow_tf32']} | " if "allow_tf32" in env else ""
    return (f"{env['machine']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
            f"CUDA {env['cuda']} | cuDNN {env['cudnn']} | {tf32}{env['date']}")


# ------------------------------------------------------------------------------------------ progress
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}"
BAR_FIXED_COLS = 45  # what BAR_FORMAT takes besides the description (counts up to 999/999, elapsed h:mm:ss)


def progress(total: int, title: str, *, enabled: bool = True, stream=None, force: bool = False):
    """A tqdm bar on stderr, drawn on a terminal only (or always with `force`); `progress_line` prints
    what each step found, on a terminal and in a log alike."""
    from tqdm import tqdm

    disable = True if not enabled else (False if force else None)  # None: tqdm draws on a TTY only
    return tqdm(total=total, desc=fit_words(title, desc_width()), file=stream or sys.stderr, leave=True,
                disable=disable, dynamic_ncols=True, bar_format=BAR_FORMAT)


def progress_line(text: str, bar=None) -> None:
    """A whole line on stderr above the bar (never cut: a terminal wraps it)."""
    from tqdm import tqdm

    tqdm.write(text, file=getattr(bar, "fp", None) or sys.stderr)


def desc_width() -> int:
    return max(shutil.get_terminal_size((100, 20)).columns - BAR_FIXED_COLS, 12)


def fit_words(text: str, width: int) -> str:
    """`text` if it fits in `width` columns, else its leading whole words and '...'."""
    if len(text) <= width:
        return text
    out = ""
    for word in text.split():
        nxt = f"{out} {word}" if out else word
        if len(nxt) + 4 > width:
            break
        out = nxt
    return out + " ..." if out else "..."


# ------------------------------------------------------------------------------------------ tables
def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


NOT_CONVERGED_MARK = "*"


def _ratio(e: dict | None) -> str:
    """'1.07x [1.04-1.10]': the ratio and its bootstrap 95% interval; '*' when it did not converge."""
    e = e or {}
    v = e.get("ratio")
    if v is None:
        return "-"
    text = f"{v:.2f}x"
    if e.get("ratio_ci95"):
        lo, hi = e["ratio_ci95"]
        text += f" [{lo:.2f}-{hi:.2f}]"
    return text + (NOT_CONVERGED_MARK if e.get("converged") is False else "")


def reference_of(payload: dict) -> str:
    """The reference module of a suite's payload: "nn.RNN", "nn.LSTM" or "nn.GRU" ("torch.nn" if mixed)."""
    return payload.get("reference") or "nn.RNN"


def suite_reference(configs) -> str:
    cells = {c.cell for c in configs}
    return f"nn.{cells.pop()}" if len(cells) == 1 else "torch.nn"


def ratio_definition(device: str, ref: str = "nn.RNN") -> str:
    ref = ref if device == "cpu" else "cuDNN"
    return f"ratio = {ref} time / ours (> 1: ours faster, < 1: ours slower)"


def ratio_legend(payload: dict) -> list[str]:
    """The lines that say how to read the ratio columns (terminal and markdown)."""
    rule = payload.get("noise_rule") or {}
    lines = [ratio_definition(payload["env"]["device"], reference_of(payload)) + "; [lo-hi] = bootstrap 95% interval"
             + (f"; {rule['text']}" if rule.get("text") else "")]
    bad = payload.get("not_converged") or []
    if bad:
        lines.append(f"{NOT_CONVERGED_MARK} did not converge (interval wider than ±{rule.get('bound', 0.05):.0%} "
                     f"at the cap): " + "; ".join(bad))
    return lines


def run_warnings(payload: dict) -> list[str]:
    """Why this run's CPU figures may mislead: other processes' load (around the run or during a
    measurement). Shown in the terminal, the markdown and on the plots."""
    env = payload["env"]
    if env.get("device") != "cpu":
        return []
    around = [v for v in (env.get("cpu_busy_by_others_pct_at_start"), env.get("cpu_busy_by_others_pct_at_end"))
              if v is not None]
    during = [r[m].get("others_cpu_pct") or 0 for r in payload["results"] for m in ("fwd", "fwd_bwd")
              if isinstance(r.get(m), dict)]
    worst = max(around + during, default=0)
    if worst <= 10:
        return []
    return [f"WARNING: other processes used up to {worst:.0f}% of the CPUs around or during the timings; "
            "CPU figures are unreliable (rerun on a quiet machine)"]


def result_line(r: dict) -> str:
    """One configuration's outcome for the terminal: parity, then each ratio with its interval."""
    parts = [f"{r['label']}: {r['status_text']}"]
    for m, name in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        if isinstance(r.get(m), dict):
            parts.append(f"{name} {_ratio(r[m])}")
    return "; ".join(parts)


def result_columns(device: str, ref: str = "nn.RNN") -> list[str]:
    label = "CPU " if device == "cpu" else ""
    ref = ref if device == "cpu" else "cuDNN"
    ours = "ours (auto)" if device == "cpu" else "ours"
    cols = ["config", "parity", f"{label}fwd {ours} ms", f"{label}fwd {ref} ms", f"{label}fwd ratio [95% CI]",
            f"{label}fwd+bwd {ours} ms", f"{label}fwd+bwd {ref} ms", f"{label}fwd+bwd ratio [95% CI]"]
    if device == "cuda":
        cols += ["fwd auto ratio", "fwd+bwd auto ratio"]
    cols.append("auto runs fwd / fwd+bwd")
    if device == "cuda":
        cols += ["fwd TFLOP/s ours/cuDNN", "fwd+bwd peak MiB ours/cuDNN", "us/step fwd (floor)"]
    return cols


def _auto_runs(r: dict) -> str:
    """What backend='auto' ran per mode ('aten': nn's own kernel), '(default)' where nothing was measured."""
    runs = r.get("auto_runs") or {}
    if not runs:
        return "-"
    return " / ".join("-" if runs.get(m) is None else runs[m]["runs"] + ("" if runs[m]["measured"] else " (default)")
                      for m in ("fwd", "fwd_bwd"))


def result_row(r: dict, device: str) -> list[str]:
    f, fb = r.get("fwd") or {}, r.get("fwd_bwd") or {}
    row = [r["label"], r["status_text"], _ms(f.get("ours_ms")), _ms(f.get("ref_ms")), _ratio(f),
           _ms(fb.get("ours_ms")), _ms(fb.get("ref_ms")), _ratio(fb)]
    if device == "cuda":
        row += ["-" if e.get("auto_ratio") is None else f"{e['auto_ratio']:.2f}x" for e in (f, fb)]
    row.append(_auto_runs(r))
    if device == "cuda":
        tf = "-" if f.get("ours_tflops") is None else (
            f"{f['ours_tflops']:.2f}/" + ("-" if f.get("ref_tflops") is None else f"{f['ref_tflops']:.2f}"))
        mem = "-" if fb.get("ours_peak_mib") is None else (
            f"{fb['ours_peak_mib']:.0f}/" + ("-" if fb.get("ref_peak_mib") is None else f"{fb['ref_peak_mib']:.0f}"))
        step = r.get("per_step") or {}
        st = "-" if step.get("ours_fwd_us") is None else (
            f"{step['ours_fwd_us']:.2f} ({step['floor_us']:.2f})" if step.get("floor_us") is not None
            else f"{step['ours_fwd_us']:.2f}")
        row += [tf, mem, st]
    return row


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def compile_columns() -> list[str]:
    return ["config", "kernel", "target", "dot precision", "W (resident/chunks, exchange)", "S x BxHxK/warps",
            "programs / SMs", "est. us/step", "regs", "spill B (in loop)", "shared KiB (limit)",
            "MMA a step (expected)", "W loads in loop", "problems"]


def compile_rows(results: list[dict]) -> list[list[str]]:
    """One row per compiled kernel. `est. us/step` is the cost model's ESTIMATE for that kernel's pass on
    the target (kernels/config.py), not a measurement."""
    rows = []
    for r in results:
        for c in r.get("compile") or []:
            kernel = c["kernel"].removeprefix("birnn_").removesuffix("_kernel")
            sms = SM_COUNT.get(c["target"])
            progs = f"{c['programs']} / {sms} ({SM_GPU[c['target']]})" if sms else str(c["programs"])
            mode = "" if c.get("split", 1) == 1 else (" persist" if c.get("persistent") else " per-step")
            path = (f"{c.get('w_hh_path', '?')} {c.get('resident_chunks', '?')}/{c.get('chunks', '?')}"
                    + (f" {c['exchange']}" if c.get("exchange") else "")
                    + (f" K split {max(c['split_k'])}" if c.get("split_k") and max(c["split_k"]) > 1 else ""))
            est = c.get("estimate_us_per_step")
            base = [r["label"], kernel, c["target"], c.get("input_precision", "?"), path,
                    f"{c.get('split', 1)}{mode} x {c['block_b']}x{c['block_h']}x{c.get('block_k', '?')}/{c['num_warps']}",
                    progs, "-" if est is None else f"~{est:.2f}"]
            if c.get("error"):
                rows.append(base + ["-"] * 5 + ["compile failed: " + c["error"].splitlines()[0][:80]])
                continue
            mma = f"{c.get('mma_per_step', '?')} ({c.get('mma_expected', '?')})" if c.get("mma_useful") else "-"
            rows.append(base + [str(c["registers"]), f"{c['spill_bytes']} ({c.get('local_in_loop', 0)})",
                                f"{c['shared'] / 1024:.1f} ({c['shared_limit'] / 1024:.0f})", mma,
                                str(c.get("weight_loads_in_loop", "?")), "; ".join(c.get("problems") or []) or "-"])
    return rows


def compile_config_lines(results: list[dict]) -> list[str]:
    """One line per configuration of a compile table: its label and how many kernels it compiled, or why
    none."""
    lines = []
    for r in results:
        rows = r.get("compile") or []
        if rows:
            failed = sum(1 for c in rows if c.get("error"))
            lines.append(f"{r['label']}: {len(rows)} kernel compile(s)" + (f", {failed} failed" if failed else ""))
        else:
            lines.append(f"{r['label']}: not compiled" + (f" ({r['compile_note']})" if r.get("compile_note") else ""))
    return lines


def compile_summary(payload: dict) -> str:
    """One line: how the compile table went."""
    if payload.get("compile_error"):
        return f"compile table not available: {payload['compile_error']}"
    rows = [c for r in payload["results"] for c in (r.get("compile") or [])]
    failed = [c for c in rows if c.get("error")]
    bad = [c for c in rows if not c.get("error") and c.get("problems")]
    targets = "/".join(sorted({c["target"] for c in rows})) or "no target"
    text = (f"compile table: {len(rows)} kernel compiles for {targets}, {len(failed)} failed, "
            f"{len(bad)} with problems (spills, shared memory, no tensor cores)")
    for c in (failed + bad)[:5]:
        why = c["error"].splitlines()[0][:100] if c.get("error") else "; ".join(c["problems"])
        text += f"\n  {c['kernel']} {c['target']} {c['dtype']} H={c['hidden_size']} B={c['batch_size']}: {why}"
    return text


# ------------------------------------------------------------------------------------------ files
def _strict(v):
    """JSON has no inf/NaN: write them as strings (a parity error of a NaN output is inf)."""
    if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(_strict(payload), f, indent=1, default=str, allow_nan=False)
    os.replace(tmp, path)


NOTES = """\
- Times are medians{how}.
- {noise}
- parity: checked on every configuration before timing it (output, h_n{cn}; for fwd+bwd also the gradients of
  the input, h0{c0} and every parameter) against {ref} with identical weights and inputs; scaled max error
  `max|a-b|/max|b|` <= tol (fp32 1e-5, fp32+TF32 and fp16 1e-2, bf16 3e-2), or no more than twice {ref}'s
  own distance from a float64 {ref}. A configuration that fails is not timed.
- FLOPs: forward `2*T*B*G*H*(I_l + P)` per direction per layer, plus `2*T*B*H*P` with a projection (G = 1 for
  the RNN, 4 LSTM, 3 GRU; P = proj_size or H; I_l = I for layer 0, 2P above; for the RNN `2*T*B*(I_l*H +
  H*H)`); forward+backward counted as 3x forward.
"""


def markdown_report(payload: dict) -> str:
    env, device = payload["env"], payload["env"]["device"]
    ref = reference_of(payload)
    cls = ref.split(".")[-1] if ref.startswith("nn.") else "RNN/LSTM/GRU"
    ours_name, torch_name = f"fused_birnn.{cls}", f"torch.nn.{cls}"
    head = result_columns(device, ref)
    rows = [result_row(r, device) for r in payload["results"]]
    title = f"# fused_birnn vs {torch_name}: suite `{payload['suite']}`" + (" (quick)" if payload.get("quick") else "")
    lines = [title, "", f"**{stamp_line(env)}**", ""]
    for w in run_warnings(payload):
        lines += [f"**{w}.**", ""]
    if payload.get("not_converged"):
        lines += [f"**Did not converge ({NOT_CONVERGED_MARK} in the table): " + "; ".join(payload["not_converged"])
                  + ".**", ""]
    auto = ("`auto runs`: what `backend='auto'` ran for each mode, measured per call shape by "
            "`fused_birnn.tune` (`aten`: nn's own kernel; `torch`: our PyTorch path; `triton`, `triton:split=S`: "
            "our kernels; `(default)`: not measured, `FUSED_BIRNN_AUTOTUNE=0`)")
    if device == "cpu":
        lines += [f"CPU figures: `{ours_name}(backend='auto')` as without the interpreter against `{torch_name}` "
                  f"on the same CPU, {env['cpu_threads']} threads. The Triton kernels ran through the interpreter "
                  "for the parity gate only (column `parity`, `triton:`), as did the PyTorch path (`torch:`); interpreter "
                  f"timings are never shown. {auto}.", ""]
    else:
        lines += [f"CUDA figures: `{ours_name}` (Triton kernels, `backend='triton'`) against `{torch_name}` (cuDNN "
                  f"{env['cudnn']}); `auto ratio`: cuDNN's time / `backend='auto'`'s, as users get it (timed in the "
                  f"same windows; a ratio of medians); {auto}. "
                  f"torch.backends.cudnn.allow_tf32 = {env.get('allow_tf32')} (our fp32 `tl.dot` follows it), "
                  f"torch.backends.cuda.matmul.allow_tf32 = {env.get('matmul_allow_tf32')}.", ""]
    if payload.get("interrupted"):
        lines += [f"**Interrupted {payload['interrupted']}.**", ""]
    lines += [markdown_table(head, rows) if rows else "_no configurations_", ""]
    lines += [ratio_definition(device, ref) + "; [lo-hi]: bootstrap 95% interval of the ratio.", ""]
    how = (f" of interleaved `time.perf_counter` runs after warm-up (ours and {ref} alternate run by run, the "
           "order flipped every round: ABBA); the "
           "CPU ratio is the median over ABBA blocks (two rounds, one in each order) of the blocks' time ratios "
           "(steadier on a shared CPU whose speed drifts, and blind to the place in a round), "
           "the ratio of the medians is in the JSON" if device == "cpu"
           else " of `triton.testing.do_bench` (CUDA events, L2 flushed), inputs rotated among "
                "pre-generated sets; peak memory from `torch.cuda.max_memory_allocated`; us/step = forward time "
                "/ (layers * T), floor = an empty persistent Triton loop of T steps, one program per direction")
    rule = payload.get("noise_rule") or {}
    noise = ("Noise: " + rule["text"] + f"; a ratio still wider at the cap is marked {NOT_CONVERGED_MARK} and "
             "listed as not converged (JSON: `converged: false`, `not_converged`)." if rule.get("text") else
             "Noise: no interval recorded.")
    lstm = ref in ("nn.LSTM", "torch.nn")
    lines += ["Notes:", "", NOTES.format(how=how, noise=noise, ref=ref, cn=", c_n" if lstm else "",
                                         c0=", c0" if lstm else "")]
    comp = compile_rows(payload["results"])
    if comp:
        tf32 = payload.get("compile_allow_tf32")
        lines += ["## Compiled kernels (sm_80 and sm_90, from `fused_birnn.compile_report`)", "",
                  markdown_table(compile_columns(), comp), "",
                  "programs = cdiv(B, block_b) * 2 directions; TC = tensor-core instructions in the SASS "
                  "(in the time loop); spill = LOCAL + STACK bytes."
                  + ("" if tf32 is None else f" fp32 compiled as a GPU run would launch it with "
                     f"torch.backends.cudnn.allow_tf32 = {tf32}."), ""]
    elif payload.get("compile_error"):
        lines += ["## Compiled kernels", "", f"not available: {payload['compile_error']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stamp(fig, env: dict) -> None:
    """Below everything else (savefig(bbox_inches="tight") keeps text outside the figure's frame)."""
    fig.text(0.005, 0.0, stamp_line(env), fontsize=6, ha="left", va="top", color="0.35")


def _plot_notes(payload: dict) -> list[str]:
    """The warnings a reader of the PNG alone must see: CPU load, ratios that did not converge."""
    import textwrap

    notes = list(run_warnings(payload))
    bad = payload.get("not_converged") or []
    if bad:
        timed = sum(isinstance(r.get(m), dict) and r[m].get("ratio") is not None
                    for r in payload["results"] for m in ("fwd", "fwd_bwd"))
        notes.append(f"{NOT_CONVERGED_MARK} did not converge: the 95% interval of {len(bad)} of {timed} ratios "
                     f"stayed wider than ±{(payload.get('noise_rule') or {}).get('bound', 0.05):.0%}")
    return [line for n in notes for line in textwrap.wrap(n, 120)]


def _add_notes(fig, ax, notes: list[str]) -> None:
    if notes:
        ax.text(0.0, 1.02, "\n".join(notes), transform=ax.transAxes, ha="left", va="bottom", fontsize=7,
                color="red")


def speedup_figure(payload: dict):
    """Horizontal bars of the ratio per configuration, forward and forward+backward, with the 95%
    interval as error bars and the value printed at each bar's end; the legend sits outside the axes."""
    plt = _pyplot()
    results, env = payload["results"], payload["env"]
    labels = [r["label"] for r in results]
    n = len(labels)
    notes = _plot_notes(payload)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.42 * max(n, 1) + 0.15 * len(notes)))
    ys = range(n)
    right = 1.0
    for k, (mode, color) in enumerate((("fwd", "tab:blue"), ("fwd_bwd", "tab:orange"))):
        entries = [r.get(mode) or {} for r in results]
        vals = [e.get("ratio") for e in entries]
        pos = [y + (k - 0.5) * 0.38 for y in ys]
        err = [[0.0] * n, [0.0] * n]
        for i, e in enumerate(entries):
            if e.get("ratio") is not None and e.get("ratio_ci95"):
                lo, hi = e["ratio_ci95"]
                err[0][i], err[1][i] = max(e["ratio"] - lo, 0.0), max(hi - e["ratio"], 0.0)
        ax.barh(pos, [v or 0 for v in vals], height=0.36, color=color, xerr=err,
                error_kw=dict(ecolor="0.25", lw=0.8, capsize=2),
                label="forward" if mode == "fwd" else "forward+backward")
        for y, e, lo_hi_err in zip(pos, entries, err[1]):
            v = e.get("ratio")
            if v is None:
                continue
            end = v + lo_hi_err
            right = max(right, end)
            ax.annotate(_ratio({"ratio": v, "converged": e.get("converged")}), (end, y), xytext=(3, 0),
                        textcoords="offset points", va="center", ha="left", fontsize=7)
    for y, r in zip(ys, results):
        if r["status"] != "ok":
            ax.text(0.02, y, r["status_text"][:60], va="center", fontsize=7, color="red",
                    transform=ax.get_yaxis_transform())
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, right * 1.22)  # room for the printed values
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    cpu = env["device"] == "cpu"
    ax.set_xlabel((f"CPU: {reference_of(payload)} time / fused_birnn (auto) time" if cpu
                   else "cuDNN time / fused_birnn time") + "  (> 1: ours faster); bars: bootstrap 95% interval")
    ax.set_title(f"{'CPU ' if cpu else ''}speedup, suite '{payload['suite']}'", pad=8 + 11 * len(notes))
    _add_notes(fig, ax, notes)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _stamp(fig, env)
    return fig


def plot_speedup(payload: dict, path: Path) -> None:
    plt = _pyplot()
    fig = speedup_figure(payload)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


SWEEP_FIELDS = {"T": "seq_len", "B": "batch", "H": "hidden_size"}


def sweep_groups(results: list[dict], var: str) -> dict[tuple, list[dict]]:
    """Results grouped by everything but `var` (input size counted with H when it equals H); only
    groups with two or more values of `var` are kept."""
    field = SWEEP_FIELDS[var]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["config"]
        tied_input = c["input_size"] == c["hidden_size"]
        key = tuple((k, v) for k, v in sorted(c.items())
                    if k not in (field, "sweep") and not (k == "input_size" and var == "H" and tied_input))
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["config"][field]) for k, v in groups.items()
            if len({r["config"][field] for r in v}) >= 2}


def _group_label(key: tuple, var: str) -> str:
    d = dict(key)
    parts = [f"{d['dtype']}", f"L{d['num_layers']}"]
    for v, f in SWEEP_FIELDS.items():
        if v != var:
            parts.append(f"{v}{d[f]}")
    return " ".join(parts)


def plot_sweep(payload: dict, var: str, path: Path) -> bool:
    """Time vs `var` (T, B or H), ours and nn.RNN's, forward and forward+backward. False if nothing sweeps it."""
    groups = sweep_groups(payload["results"], var)
    if not groups:
        return False
    plt = _pyplot()
    env = payload["env"]
    cpu = env["device"] == "cpu"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    field = SWEEP_FIELDS[var]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward+backward")):
        for i, (key, rs) in enumerate(groups.items()):
            color = colors[i % len(colors)]
            xs = [r["config"][field] for r in rs]
            ours = [(r.get(mode) or {}).get("ours_ms") for r in rs]
            ref = [(r.get(mode) or {}).get("ref_ms") for r in rs]
            lab = _group_label(key, var)
            if any(v is not None for v in ours):
                ax.plot(xs, [float("nan") if v is None else v for v in ours], "o-", color=color,
                        label=f"ours {lab}")
            if any(v is not None for v in ref):
                ax.plot(xs, [float("nan") if v is None else v for v in ref], "s--", color=color,
                        label=f"{reference_of(payload)} {lab}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(var)
        ax.set_ylabel(("CPU " if cpu else "") + "time (ms)")
        ax.set_title(f"{'CPU ' if cpu else ''}{title} time vs {var}")
        ax.grid(True, which="both", lw=0.3)
        if ax.get_legend_handles_labels()[0]:  # below the axes: never over the lines
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    notes = _plot_notes(payload)
    fig.suptitle(f"suite '{payload['suite']}': solid = fused_birnn{' (auto)' if cpu else ''}, "
                 f"dashed = {reference_of(payload)}{'' if cpu else ' (cuDNN)'}", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    if notes:  # above the title; savefig(bbox_inches="tight") keeps it in the image
        fig.text(0.5, 1.0, "\n".join(notes), ha="center", va="bottom", fontsize=7, color="red")
    _stamp(fig, env)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_plots(payload: dict, out_dir: Path, stem: str) -> list[Path]:
    written = []
    p = out_dir / f"{stem}_speedup.png"
    plot_speedup(payload, p)
    written.append(p)
    for var in ("T", "B", "H"):
        p = out_dir / f"{stem}_vs_{var}.png"
        if plot_sweep(payload, var, p):
            written.append(p)
    return written
