"""The one bounded GPU command: what `bash bench/gpu_run.sh OUT once` runs after its set-up.

A lent GPU comes for 15 device-minutes in all, start included, and one command may run 10 minutes. This
runs, within a wall-time budget (default 540 s from the start of gpu_run.sh, `BENCH_BUDGET`), the checks
that matter most, in this order, and keeps whatever finished when a step is cut:

1. `env`: what is installed (GPU, driver, Python, torch, triton, numpy, CUDA, cuDNN, the C compiler and
   `Python.h` Triton 3.6 builds each kernel's launcher with, compute-sanitizer, setuptools, pytest and its
   plugins), and one tiny Triton kernel compiled and launched, so that a failure explains itself. Runs
   before gpu_run.sh's set-up.
2. `tests`: the CUDA tests of every cell (`BENCH_ONCE_TESTS`, marker `cuda`) but the long-sequence ones,
   split over `BENCH_TEST_JOBS` pytest processes (default half the cores, at most 8) so that Triton's
   compiles (single-threaded, one per kernel specialisation) use several cores. Not pytest-xdist: a
   disjoint split (`gpu_once_shard.py`) needs no plugin on the GPU image and records each test's outcome
   the moment it is known, so a cut process loses only the test it was running.
3. `tests-last`: the tests matching `BENCH_ONCE_LAST` (default `long_sequence`: T = 70,000-100,000, tens of
   GB each), alone, after the others.
4. one step per suite of `BENCH_ONCE_SUITES` (default `tagger pyannote deepbench:quick`: a small-H RNN,
   an LSTM workload at its real size, a large-H RNN), each `python -m fused_birnn.bench`, whose JSON is
   written after every configuration and which, on SIGINT, writes what it measured.

Each step gets a share of the time left: `left * share / (sum of the shares of the steps not yet run)`,
`left` being the budget minus what has passed minus a reserve for the final report. A step that ends
early leaves its time to the later ones; a step still running at the end of its time gets SIGINT (pytest
and the bench write their reports), then SIGKILL after a grace period. Shares (seconds at the default
budget; the basis of each in bench/README.md): `BENCH_ONCE_TESTS_S` (210), `BENCH_ONCE_LAST_S` (90),
`BENCH_ONCE_SUITE_S` (60 per suite, or `NAME=SECONDS` in `BENCH_ONCE_SUITES`).

Everything is written into a work folder outside OUT, and after every step OUT is refreshed with four
files, flat, a few MB in all (what the device tool returns: at most 8 files, each <= 16 MiB, at most 2
folders deep): `summary.md` (the steps, the test outcomes, the suites' tables with the GPU named),
`env.txt`, `gpu_run.log` (written by gpu_run.sh) and `gpu_run_results.tar.gz` (all of it: logs, each
test's outcome, JUnit XML, each suite's JSON, markdown and plots).

Standard library only in this process (it must report even when torch cannot be imported).

    python bench/gpu_once.py env --work DIR --out OUT
    python bench/gpu_once.py run --work DIR --out OUT --repo REPO --run-dir DIR --deadline EPOCH --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the plan kinds and the cooperative launch first (they decide whether the plans run as designed)
DEFAULT_TESTS = ("tests/test_cuda_plans.py", "tests/test_cuda.py", "tests/test_cuda_lstm_gru.py",
                 "tests/test_torch_cells.py", "tests/test_autocast.py")
DEFAULT_SUITES = "tagger pyannote deepbench:quick"
DEFAULT_SHARES = {"tests": 210.0, "tests-last": 90.0, "suite": 60.0}
SHARE_VARS = {"tests": "BENCH_ONCE_TESTS_S", "tests-last": "BENCH_ONCE_LAST_S", "suite": "BENCH_ONCE_SUITE_S"}
FINAL_RESERVE_S = 10.0  # the last summary and tarball
MIN_STEP_S = 5.0  # a step given less is skipped
TARBALL = "gpu_run_results.tar.gz"
OUT_FILES = ("summary.md", "env.txt", "gpu_run.log", TARBALL)
DTYPES = ("fp32", "fp16", "bf16", "fp64")


# ------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Step:
    name: str
    kind: str  # "tests", "tests-last" or "suite"
    share: float
    suite: str = ""
    quick: bool = False
    dtypes: tuple[str, ...] = ()
    # filled in when run
    given_s: float | None = None
    ran_s: float | None = None
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    status: str = "not reached"


def parse_suites(spec: str, default_share: float) -> list[Step]:
    """`NAME[:quick][:DTYPE...][=SECONDS]` separated by spaces -> suite steps."""
    steps = []
    for token in spec.split():
        token, _, seconds = token.partition("=")
        name, *opts = token.split(":")
        quick = "quick" in opts
        dtypes = tuple(o for o in opts if o != "quick")
        bad = [d for d in dtypes if d not in DTYPES]
        if not name or bad:
            raise ValueError(f"suite spec {token!r}: expected NAME[:quick][:DTYPE...][=SECONDS], DTYPE in {DTYPES}")
        steps.append(Step(f"suite {token}", "suite", float(seconds) if seconds else default_share, suite=name,
                          quick=quick, dtypes=dtypes))
    return steps


def plan(environ: dict[str, str]) -> list[Step]:
    share = {k: float(environ.get(SHARE_VARS[k], v)) for k, v in DEFAULT_SHARES.items()}
    steps = [Step("tests", "tests", share["tests"])]
    if environ.get("BENCH_ONCE_LAST", "long_sequence").strip():
        steps.append(Step("tests-last", "tests-last", share["tests-last"]))
    return steps + parse_suites(environ.get("BENCH_ONCE_SUITES", DEFAULT_SUITES), share["suite"])


def time_for(steps: list[Step], index: int, left_s: float) -> float:
    """Seconds step `index` may run: its share of what is left, shared with the steps after it."""
    rest = sum(s.share for s in steps[index:])
    return max(0.0, left_s) * steps[index].share / rest if rest > 0 else 0.0


def grace_for(given_s: float) -> float:
    """Seconds between SIGINT and SIGKILL: pytest writes its JUnit XML, the bench its JSON, markdown and plots."""
    return min(20.0, max(2.0, 0.25 * given_s))


# ---------------------------------------------------------------------------------- bounded processes
def run_bounded(commands: list[dict], limit_s: float) -> tuple[list[int], bool]:
    """Start every command (dicts of Popen arguments plus `log`, a path for stdout and stderr) in its own
    process group; at `limit_s - grace` send SIGINT to the groups still running, SIGKILL at `limit_s`.
    Returns the exit codes (negative: killed by that signal) and whether the limit cut anything."""
    t0 = time.monotonic()
    grace = grace_for(limit_s)
    procs = []
    for c in commands:
        c = dict(c)
        log = open(c.pop("log"), "ab")
        procs.append((subprocess.Popen(stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **c), log))
    cut = False
    sent: set[int] = set()
    try:
        while any(p.poll() is None for p, _ in procs):
            elapsed = time.monotonic() - t0
            for sig, at in ((signal.SIGINT, limit_s - grace), (signal.SIGKILL, limit_s)):
                if elapsed >= at and sig not in sent:
                    sent.add(sig)
                    for p, _ in procs:
                        if p.poll() is None:
                            cut = True
                            _signal_group(p, sig)
            if signal.SIGKILL in sent and elapsed > limit_s + 10:  # unkillable (a hung driver call): move on
                break
            time.sleep(0.2)
    except BaseException:
        for p, _ in procs:
            _signal_group(p, signal.SIGKILL)
        raise
    finally:
        for _, log in procs:
            log.close()
    return [p.returncode if p.returncode is not None else -9 for p, _ in procs], cut


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------- steps
def _pytest_commands(step: Step, args, environ: dict[str, str]) -> list[dict]:
    repo = Path(args.repo)
    paths = [str(p if Path(p).is_absolute() else repo / p)
             for p in environ.get("BENCH_ONCE_TESTS", " ".join(DEFAULT_TESTS)).split()]
    last = environ.get("BENCH_ONCE_LAST", "long_sequence").strip()
    mark = environ.get("BENCH_ONCE_MARK", "cuda")
    jobs = 1 if step.kind == "tests-last" else shard_count(environ)
    select = (["-k", last] if step.kind == "tests-last" else ["-k", f"not ({last})"] if last else [])
    tests_dir = Path(args.work) / "tests"
    tests_dir.mkdir(parents=True, exist_ok=True)
    commands = []
    for i in range(jobs):
        stem = tests_dir / ("last" if step.kind == "tests-last" else f"shard{i}")
        env = dict(environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", FUSED_BIRNN_SHARD=f"{i}/{jobs}",
                   FUSED_BIRNN_SHARD_OUT=str(stem),
                   PYTHONPATH=os.pathsep.join([str(HERE), *filter(None, [environ.get("PYTHONPATH")])]))
        # Inductor's compile workers (the torch.compile tests): the cores divided among the processes
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // jobs)))
        cmd = [sys.executable, "-m", "pytest", "-p", "gpu_once_shard", "-p", "no:cacheprovider",
               *(["-m", mark] if mark else []), *select, "-v", "-rfEs", "--tb=short",
               f"--junitxml={stem}.xml", *paths]
        commands.append(dict(args=cmd, cwd=args.run_dir, env=env, log=f"{stem}.log"))
    return commands


def shard_count(environ: dict[str, str]) -> int:
    if environ.get("BENCH_TEST_JOBS"):
        return max(1, int(environ["BENCH_TEST_JOBS"]))
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _suite_command(step: Step, args, environ: dict[str, str]) -> dict:
    results = Path(args.work) / "results"
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fused_birnn.bench", "--suite", step.suite, "--device", args.device,
           "--out", str(results), "--no-compile"]
    if step.quick:
        cmd.append("--quick")
    if step.dtypes:
        cmd += ["--dtype", *step.dtypes]
    log = Path(args.work) / f"suite_{re.sub(r'[^A-Za-z0-9_.-]', '_', step.name.split(' ', 1)[1])}.log"
    return dict(args=cmd, cwd=args.run_dir, env=dict(environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg"), log=str(log))


def run_steps(steps: list[Step], args, environ: dict[str, str], refresh) -> None:
    for i, step in enumerate(steps):
        left = args.deadline - time.time() - FINAL_RESERVE_S
        given = time_for(steps, i, left)
        step.given_s = round(given, 1)
        if given < MIN_STEP_S:
            step.status = f"skipped: {max(0.0, left):.0f} s of the budget left"
            _say(args, f"step {step.name}: {step.status}")
            refresh()
            continue
        commands = (_pytest_commands(step, args, environ) if step.kind != "suite"
                    else [_suite_command(step, args, environ)])
        _say(args, f"step {step.name}: {len(commands)} process(es), at most {given:.0f} s: "
                   + " ".join(commands[0]["args"][1:]))
        t0 = time.monotonic()
        try:
            step.exit_codes, cut = run_bounded(commands, given)
        except OSError as e:
            step.status = f"failed to start: {e}"
            refresh()
            continue
        step.ran_s = round(time.monotonic() - t0, 1)
        step.status = "cut by the budget" if cut else ("done" if all(c == 0 for c in step.exit_codes) else
                                                       "done, with failures")
        _say(args, f"step {step.name}: {step.status} after {step.ran_s:.0f} s (exit {step.exit_codes})")
        refresh()


def _say(args, text: str) -> None:
    line = f"[gpu_once {time.strftime('%H:%M:%S')}] {text}"
    print(line, file=sys.stderr, flush=True)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------ the environment
SMOKE = r'''
import time, torch, triton, triton.language as tl

@triton.jit
def _plus_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)

x = torch.arange(1000, device="cuda", dtype=torch.float32)
y = torch.full_like(x, float("nan"))
t0 = time.perf_counter()
_plus_one[(4,)](x, y, 1000, BLOCK=256)
torch.cuda.synchronize()
first = time.perf_counter() - t0
t0 = time.perf_counter()
_plus_one[(4,)](x, y, 1000, BLOCK=256)
torch.cuda.synchronize()
print(f"first launch {first:.2f} s (compile + launcher build), second {time.perf_counter() - t0:.4f} s, "
      f"result {'ok' if torch.equal(y, x + 1) else 'WRONG'}")
'''

PACKAGES = ("torch", "triton", "numpy", "setuptools", "pip", "wheel", "packaging", "pytest", "pytest-xdist",
            "pytest-timeout", "pytest-benchmark", "expecttest", "matplotlib", "tqdm", "onnx", "onnxscript",
            "onnxruntime", "fused_birnn")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _vtuple(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:2])


def _run(cmd: list[str], timeout: float = 60, **kw) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        return (p.stdout + p.stderr).strip() if p.returncode == 0 else f"exit {p.returncode}: {(p.stdout + p.stderr).strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({type(e).__name__}: {e})"


def c_compiler() -> tuple[str | None, str]:
    """The compiler Triton's launcher build picks (`triton/runtime/build.py`: $CC, else gcc, else clang)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    return cc, (_run([cc, "--version"]).splitlines() or [""])[0] if cc else "none"


def python_h() -> str:
    """Where Triton looks for Python.h (its build.py: the default scheme, posix_local as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return os.path.join(sysconfig.get_paths(scheme=scheme)["include"], "Python.h")


def compute_sanitizer() -> str | None:
    return shutil.which("compute-sanitizer") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))),
                                                     None)


def collect_env(work: Path, device: str, repo: str | None) -> dict:
    env: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": os.uname().nodename,
                 "cpus": os.cpu_count(), "device": device, "python": sys.executable,
                 "python_version": sys.version.split()[0], "PYTHON": os.environ.get("PYTHON")}
    try:
        meminfo = Path("/proc/meminfo").read_text()
        env["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    env["disk_free_gib"] = round(shutil.disk_usage(work).free / 2**30, 1)
    env["packages"] = {p: _version(p) for p in PACKAGES}
    env["nvidia_smi"] = (_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode",
                               "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "not found")
    cc, cc_version = c_compiler()
    env.update(c_compiler=cc, c_compiler_version=cc_version, python_h=python_h(),
               python_h_exists=os.path.exists(python_h()), compute_sanitizer=compute_sanitizer(),
               triton_cache_dir=os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"))
    probe = ("import json, torch; c = torch.cuda.is_available(); p = torch.cuda.get_device_properties(0) if c else None; "
             "print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, "
             "cudnn=torch.backends.cudnn.version(), cuda_available=c, gpu=p.name if c else None, "
             "capability='%d.%d' % (p.major, p.minor) if c else None, sms=p.multi_processor_count if c else None, "
             "gpu_memory_gib=round(p.total_memory / 2**30, 1) if c else None, "
             "cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)))")
    out = _run([sys.executable, "-c", probe], timeout=120)
    try:
        env["torch"] = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        env["torch"] = {"error": out[-2000:]}
    if repo:
        env["commit"] = _run(["git", "-C", repo, "rev-parse", "HEAD"])
    if device == "cuda" and env["torch"].get("cuda_available"):
        smoke = work / "triton_smoke.py"
        smoke.write_text(SMOKE)
        cache = work / "triton_smoke_cache"  # an empty cache: the first launch compiles for real
        env["triton_smoke"] = _run([sys.executable, str(smoke)], timeout=180,
                                   env=dict(os.environ, TRITON_CACHE_DIR=str(cache), TRITON_INTERPRET="0"))
    env["warnings"] = env_warnings(env)
    return env


def env_warnings(env: dict) -> list[str]:
    """What will make later steps fail, said before they run."""
    w = []
    pk = env["packages"]
    if not env.get("c_compiler"):
        w.append("no C compiler (CC, gcc, clang): Triton builds each kernel's launcher with one, so every "
                 "kernel launch will fail")
    if not env.get("python_h_exists"):
        w.append(f"{env.get('python_h')} is missing: Triton's launcher build includes it, so every kernel "
                 "launch will fail (install the Python development headers)")
    if env["device"] == "cuda" and not env["torch"].get("cuda_available"):
        w.append(f"torch sees no CUDA device: {env['torch'].get('error', '')[-300:]}")
    smoke = env.get("triton_smoke")
    if smoke is not None and "result ok" not in smoke:
        w.append(f"the Triton smoke kernel failed: {smoke[-500:]}")
    if not pk.get("pytest"):
        w.append("pytest is not installed: the test steps cannot run")
    if not pk.get("expecttest"):
        w.append("expecttest is not installed: tests/test_torch_module_db.py (torch's module harness) cannot be "
                 "collected; the once mode does not run it")
    if (pk.get("setuptools") is None or _vtuple(pk.get("setuptools")) < (77,)
            or (pk.get("packaging") is not None and _vtuple(pk.get("packaging")) < (24, 2))):
        w.append(f"setuptools {pk.get('setuptools')}, packaging {pk.get('packaging')}: the offline editable "
                 "install needs setuptools >= 77 and, where installed, packaging >= 24.2 (pyproject's PEP 639 "
                 "license fields); gpu_run.sh uses its PYTHONPATH shim instead")
    if _vtuple(pk.get("triton")) < (3, 7) and _vtuple(pk.get("numpy")) >= (2, 4):
        w.append(f"triton {pk.get('triton')} with numpy {pk.get('numpy')}: Triton's interpreter fails on runtime "
                 "loop bounds (not used on a GPU; the bench's CPU parity gate would fail)")
    return w


def format_env(env: dict) -> str:
    t = env["torch"]
    pk = env["packages"]
    lines = [
        f"date {env['date']}  host {env['host']}  {env['cpus']} CPUs  {env.get('memory_gib')} GiB  "
        f"{env['disk_free_gib']} GiB free",
        f"GPU (nvidia-smi: name, driver, memory, compute mode): {env['nvidia_smi']}",
        f"torch: {t.get('torch')}  CUDA {t.get('cuda')}  cuDNN {t.get('cudnn')}  GPU {t.get('gpu')} "
        f"(sm {t.get('capability')}, {t.get('sms')} SMs, {t.get('gpu_memory_gib')} GiB)  "
        f"cudnn.allow_tf32 {t.get('cudnn_allow_tf32')}" if "error" not in t else f"torch: FAILED {t['error']}",
        f"python {env['python_version']} at {env['python']} (PYTHON={env['PYTHON']})",
        "packages: " + ", ".join(f"{k} {v or '-'}" for k, v in pk.items()),
        f"C compiler: {env['c_compiler'] or 'none'} ({env['c_compiler_version']})",
        f"Python.h: {env['python_h']} ({'found' if env['python_h_exists'] else 'MISSING'})",
        f"compute-sanitizer: {env['compute_sanitizer'] or 'not found'}",
        f"Triton cache: {env['triton_cache_dir']}",
    ]
    if "triton_smoke" in env:
        lines.append(f"Triton smoke kernel: {env['triton_smoke']}")
    if env.get("commit"):
        lines.append(f"commit {env['commit']}")
    lines += [f"WARNING: {w}" for w in env["warnings"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ reporting
def read_outcomes(tests_dir: Path, stem_glob: str) -> dict:
    """Every test's outcome from the shards' records: passed / failed / skipped / cut (started, never
    finished) / not run (assigned, never started)."""
    outcome: dict[str, str] = {}
    message: dict[str, str] = {}
    duration: dict[str, float] = {}
    assigned: list[str] = []
    for ids in sorted(tests_dir.glob(f"{stem_glob}.ids")):
        assigned += ids.read_text().split()
    for log in sorted(tests_dir.glob(f"{stem_glob}.jsonl")):
        for line in log.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line cut by SIGKILL
                continue
            nid = r["nodeid"]
            if r["when"] == "start":
                outcome.setdefault(nid, "cut")
                continue
            duration[nid] = duration.get(nid, 0.0) + r.get("duration", 0.0)
            if r["outcome"] == "failed":
                outcome[nid] = "failed" if r["when"] == "call" else "error"
                message.setdefault(nid, r.get("message", ""))
            elif r["outcome"] == "skipped" and outcome.get(nid) in (None, "cut"):
                outcome[nid] = "skipped"
                message.setdefault(nid, r.get("message", ""))
            elif r["when"] == "call" and outcome.get(nid) in (None, "cut"):
                outcome[nid] = "passed"
    for nid in assigned:
        outcome.setdefault(nid, "not run")
    counts: dict[str, int] = {}
    for o in outcome.values():
        counts[o] = counts.get(o, 0) + 1
    return dict(outcome=outcome, message=message, duration=duration, counts=counts)


def _tests_section(title: str, res: dict) -> list[str]:
    order = ("passed", "failed", "error", "skipped", "cut", "not run")
    counts = ", ".join(f"{res['counts'][k]} {k}" for k in order if res["counts"].get(k))
    lines = [f"## {title}: {counts or 'no results'}", ""]
    if res["counts"].get("cut") or res["counts"].get("not run"):
        lines.append("(cut: running when the budget ran out; not run: assigned, never started)")
    bad = [n for n, o in res["outcome"].items() if o in ("failed", "error", "cut")]
    for nid in bad:
        msg = res["message"].get(nid, "").strip().replace("\n", "\n      ")
        lines.append(f"- {res['outcome'][nid].upper()} `{nid}`" + (f"\n      {msg}" if msg else ""))
    skipped = [n for n, o in res["outcome"].items() if o == "skipped"]
    if skipped:
        reasons: dict[str, int] = {}
        for nid in skipped:
            r = res["message"].get(nid, "").strip().splitlines()
            reasons[r[-1] if r else "?"] = reasons.get(r[-1] if r else "?", 0) + 1
        lines += [f"- skipped {n}x: {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    slow = sorted(((n, d) for n, d in res["duration"].items() if d >= 0.5), key=lambda kv: -kv[1])[:10]
    if slow:
        lines += ["", "slowest: " + "; ".join(f"{n.split('::')[-1]} {d:.1f} s" for n, d in slow)]
    return lines + [""]


def write_summary(steps: list[Step], args, env: dict | None, finished: bool) -> str:
    work = Path(args.work)
    t = (env or {}).get("torch", {})
    gpu = t.get("gpu") or ("CPU dry run" if args.device == "cpu" else "no GPU seen")
    used = time.time() - args.started
    lines = [f"# fused_birnn: `gpu_run.sh OUT once` on {gpu}", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}; budget {args.deadline - args.started:.0f} s, "
             f"{used:.0f} s used{'' if finished else ' so far (still running, or stopped from outside)'}; "
             f"torch {t.get('torch')}, triton {(env or {}).get('packages', {}).get('triton')}, "
             f"CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}; commit {(env or {}).get('commit', '?')[:12]}", "",
             "| step | share s | given s | ran s | exit | outcome |", "|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.share:.0f} | {'' if s.given_s is None else f'{s.given_s:.0f}'} | "
                     f"{'' if s.ran_s is None else f'{s.ran_s:.0f}'} | {' '.join(map(str, s.exit_codes))} | {s.status} |")
    lines.append("")
    if env and env.get("warnings"):
        lines += ["## Environment warnings", ""] + [f"- {w}" for w in env["warnings"]] + [""]
    tests_dir = work / "tests"
    if tests_dir.is_dir():
        for title, stem in (("CUDA tests", "shard*"), ("Last tests (long sequences)", "last")):
            if list(tests_dir.glob(f"{stem}.ids")) or list(tests_dir.glob(f"{stem}.jsonl")):
                lines += _tests_section(title, read_outcomes(tests_dir, stem))
    results = work / "results"
    for s in steps:
        if s.kind != "suite":
            continue
        for md in sorted(results.glob(f"{s.suite}*.md")) if results.is_dir() else []:
            table = re.sub(r"(?m)^# ", "### ", md.read_text().strip())  # its title under ours
            lines += [f"## Suite `{md.stem}` ({s.status})", "", table, ""]
    lines += ["## Files", "",
              f"`{TARBALL}` holds everything: env.json, steps.json, tests/ (each shard's log, JUnit XML, "
              "outcomes as JSON lines), results/ (each suite's JSON, markdown and PNG plots), suite logs.", ""]
    return "\n".join(lines)


def refresh(steps: list[Step], args, env: dict | None, finished: bool = False) -> None:
    """Rewrite OUT's files from the work folder (each written aside, then renamed into place)."""
    work, out = Path(args.work), Path(args.out)
    (work / "steps.json").write_text(json.dumps([dataclasses.asdict(s) for s in steps], indent=1))
    summary = write_summary(steps, args, env, finished)
    (work / "summary.md").write_text(summary)
    _replace(out / "summary.md", summary.encode())
    part = out / (TARBALL + ".part")
    with tarfile.open(part, "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and not p.is_symlink() and not {"triton_smoke_cache", ".shim"} & set(p.parts):
                tar.add(p, arcname=str(Path("gpu_run") / p.relative_to(work)))
        if args.log and os.path.exists(args.log):
            tar.add(args.log, arcname="gpu_run/gpu_run.log")
    os.replace(part, out / TARBALL)


def _replace(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/gpu_once.py", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("env", "run"))
    ap.add_argument("--work", required=True, help="work folder (outside OUT)")
    ap.add_argument("--out", required=True, help="OUT: the handful of files to keep")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--repo", default=str(HERE.parent))
    ap.add_argument("--run-dir", default=None, help="where the steps' processes run (default: the repo)")
    ap.add_argument("--started", type=float, default=None, help="epoch seconds when the budget started")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds by which everything is written")
    ap.add_argument("--log", default=None, help="the run's log (gpu_run.log), appended to and packed")
    ap.add_argument("--setup-failed", action="store_true", help="fused_birnn is not importable: report only")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    args.run_dir = args.run_dir or args.repo
    args.started = args.started or time.time()
    args.deadline = args.deadline or args.started + float(os.environ.get("BENCH_BUDGET", 540))

    if args.command == "env":
        env = collect_env(work, args.device, args.repo)
        (work / "env.json").write_text(json.dumps(env, indent=1))
        text = format_env(env)
        (work / "env.txt").write_text(text)
        _replace(out / "env.txt", text.encode())
        sys.stderr.write(text)
        return 0

    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else None
    environ = dict(os.environ)
    steps = plan(environ)
    if args.setup_failed:
        for s in steps:
            s.status = "not run: fused_birnn is not importable (gpu_run.log)"
    stop = []

    def on_term(signum, frame):  # the device tool's limit or a Ctrl-C: report what there is, then stop
        stop.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        refresh(steps, args, env)
        if not args.setup_failed:
            run_steps(steps, args, environ, lambda: refresh(steps, args, env))
    except KeyboardInterrupt:
        _say(args, "stopped from outside; writing what there is")
    refresh(steps, args, env, finished=True)
    _say(args, f"done in {time.time() - args.started:.0f} s of {args.deadline - args.started:.0f}; OUT holds "
               + ", ".join(sorted(p.name for p in out.iterdir())))
    return 130 if stop else 0


if __name__ == "__main__":
    sys.exit(main())
