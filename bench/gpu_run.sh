#!/usr/bin/env bash
# What a lent GPU machine runs, with nothing to install (torch, triton preinstalled; no network).
#
#   bash bench/gpu_run.sh OUTDIR once[:SECONDS]     # the one bounded command (default 540 s, BENCH_BUDGET)
#   bash bench/gpu_run.sh OUTDIR [STEP ...]         # longer leases: any steps, each bounded on its own
#
# `once`: everything that decides the first GPU run inside one GPU-tool command (10 minutes at most),
# Triton's compiles included, within SECONDS of wall time from this script's start, keeping what finished
# when a step is cut (bench/gpu_once.py does the steps; bench/README.md "On a lent GPU machine"):
#   1. env:        what is installed (GPU, driver, python/torch/triton/numpy, CUDA, cuDNN, the C compiler
#                  and Python.h that Triton 3.6 builds each kernel's launcher with, compute-sanitizer,
#                  setuptools, pytest) and a tiny Triton kernel compiled and launched -> OUT/env.txt
#   2. set-up:     fused_birnn importable from this checkout (installed, offline editable install, or a
#                  PYTHONPATH shim)
#   3. tests:      the CUDA tests of every cell (RNN, LSTM with proj_size, GRU; fp32/fp16/bf16; split plans;
#                  packed; determinism; CUDA graphs; torch.compile) in BENCH_TEST_JOBS parallel pytest
#                  processes over disjoint shares (default: half the cores, at most 8), so that compiles
#                  use several cores
#   4. tests-last: the long-sequence tests (T = 70,000-100,000, tens of GB each), alone
#   5. suites:     tagger (small-H RNN), pyannote (LSTM workload, real size), deepbench --quick (H=1760)
#                  against cuDNN: JSON, markdown and plots with the GPU named
# Each of steps 3-5 gets its share of the time left (a step that ends early leaves its time to the rest);
# at the end of its time SIGINT (pytest and the bench write what they have), then SIGKILL.
# Timing budget at the default 540 s (bench/README.md gives the basis of each figure; kernel times are
# estimates, compile times measured on a CPU with `python -m fused_birnn.compile_report`):
#   start          ~25 s  Python, env report, set-up (measured 9-21 s on a 2-core CPU without a GPU;
#                         the smoke kernel on the GPU estimated 3-5 s)
#   tests          210 s  share: ~150 kernel specialisations x (0.25-1.5 s compile + 0.2-0.5 s launcher
#                         build, measured) over 8 processes, + start-up, 2 torch.compile tests (estimated)
#   tests-last      90 s  share: 4 tests, estimated 5-15 s each
#   3 suites   3 x  60 s  share: 2-3 configurations each, estimated 10-20 s per configuration
#   report          10 s  reserve (summary + tarball: measured < 1 s)
#   margin         ~25 s  to 540 s; the GPU tool stops a command at 600 s
# OUT then holds four files, flat, a few MB (the GPU tool returns at most 8 files, <= 16 MiB each, at most
# 2 folders deep): summary.md, env.txt, gpu_run.log, gpu_run_results.tar.gz (every log, each test's outcome,
# JUnit XML, each suite's JSON/markdown/PNG). They are rewritten after every step: a command killed from
# outside still leaves the steps it finished. Knobs: BENCH_BUDGET, BENCH_TEST_JOBS, BENCH_ONCE_TESTS (test
# files), BENCH_ONCE_LAST (-k of the last tests), BENCH_ONCE_SUITES ("NAME[:quick][:DTYPE][=SECONDS] ..."),
# BENCH_ONCE_TESTS_S / BENCH_ONCE_LAST_S / BENCH_ONCE_SUITE_S (shares), BENCH_DEVICE=cpu (a dry run here).
#
# STEP (longer leases): setup | tests | sanitize | compile | quick | all | lstm-gru | a suite (seed tagger
#       latency scaling deepbench speech; LSTM/GRU: pyannote tacotron2 openunmix espnet deepspeech
#       deepspeech2 nemo) | SUITE:DTYPE (e.g. speech:fp16, to split a long suite across commands).
# `tests` runs every CUDA test (module_db samples included, 182 tests: longer than one command with the
# compiles); `sanitize` (only when asked, also in `all` only with BENCH_SANITIZE=1) runs the small split
# test under compute-sanitizer's racecheck and synccheck (up to 3 x 530 s). `lstm-gru` runs the seven
# LSTM/GRU suites, each bounded by BENCH_LSTM_GRU_SUITE_TIMEOUT seconds (default 75). Default (no STEP):
# all. Every step is bounded by `timeout` (BENCH_STEP_TIMEOUT seconds, default 530); a step that fails or
# times out does not stop the next ones; a suite writes its JSON after every configuration. Writes under
# OUTDIR: results/ (JSON, md, PNG per suite), tests.log, sanitize_*.log, tests.xml, gpu_run.log, env.txt;
# and copies results/ to bench/results/gpu/ in the checkout. Many files: through the GPU tool (8 files
# back), prefer `once` or fetch a tarball of OUTDIR.
#
# Python: $PYTHON if set, else the first of python3, python that imports torch (else the first found).
set -u -o pipefail

if [ $# -lt 1 ]; then
    sed -n '2,54p' "$0"
    exit 2
fi
START_EPOCH=$(date +%s)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-530}
LSTM_GRU_SUITE_TIMEOUT=${BENCH_LSTM_GRU_SUITE_TIMEOUT:-75}
LSTM_GRU_SUITES=(pyannote tacotron2 openunmix espnet deepspeech deepspeech2 nemo)
DEVICE=${BENCH_DEVICE:-cuda}   # BENCH_DEVICE=cpu: a dry run of this script on a machine without a GPU
LOG="$OUT/gpu_run.log"
RUN_DIR="$REPO"   # where python runs from; a neutral folder when fused_birnn comes from the shim
export TRITON_INTERPRET=0
export MPLBACKEND=Agg
export PYTHONUNBUFFERED=1

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(all)
BUDGET=""
for step in "${STEPS[@]}"; do
    case "$step" in
        once) BUDGET=${BENCH_BUDGET:-540} ;;
        once:*) BUDGET=${step#once:} ;;
    esac
done
if [ -n "$BUDGET" ]; then
    if [ ${#STEPS[@]} -ne 1 ] || ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
        echo "once runs alone, its budget a whole number of seconds: bash bench/gpu_run.sh OUTDIR once[:SECONDS]" >&2
        exit 2
    fi
    # everything but the handful of files OUT keeps lives outside OUT (packed into OUT after every step)
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fused_birnn_gpu_run.XXXXXX")
    trap 'rm -rf "$SCRATCH"' EXIT
else
    SCRATCH="$OUT"
fi
RESULTS="$SCRATCH/results"
mkdir -p "$RESULTS"

say() { echo "[gpu_run $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

find_python() {  # PY: $PYTHON, else the first of python3, python that imports torch, else the first found
    if [ -n "${PYTHON:-}" ]; then
        PY=$PYTHON
        command -v "$PY" >/dev/null 2>&1 || { say "FATAL: PYTHON=$PYTHON not found"; exit 1; }
        return 0
    fi
    local c first=""
    for c in python3 python; do
        command -v "$c" >/dev/null 2>&1 || continue
        [ -n "$first" ] || first=$c
        if "$c" -c "import torch" >/dev/null 2>&1; then
            PY=$c
            return 0
        fi
    done
    if [ -z "$first" ]; then
        say "FATAL: neither python3 nor python is on PATH (set PYTHON=/path/to/python)"
        exit 1
    fi
    PY=$first
    say "WARNING: neither python3 nor python imports torch; using $first"
}

importable() {
    # fused_birnn, its kernels (package-dir mapping) and the bench module, from this checkout
    (cd "$1" && "$PY" - "$REPO" <<'EOF'
import os, sys
import fused_birnn, fused_birnn.kernels.forward, fused_birnn.bench  # noqa: E401
repo = os.path.realpath(sys.argv[1])
assert os.path.realpath(fused_birnn.__file__).startswith(repo + os.sep), fused_birnn.__file__
EOF
    ) >>"$LOG" 2>&1
}

setup() {
    say "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
    if [ "${BENCH_FORCE_SHIM:-0}" = 1 ]; then
        say "BENCH_FORCE_SHIM=1: skipping the installed package and pip"
    elif importable "$REPO" && importable /tmp; then
        say "fused_birnn already importable from this checkout"
        return 0
    else
        install || true
        importable "$REPO" && return 0
    fi
    shim
}

install() {
    # PEP 639 license fields: setuptools >= 77, and packaging >= 24.2 where one is installed (setuptools
    # prefers it to its own copy; measured: setuptools 77.0.3, 81.0.0 and 84.2.1 all fail with packaging 23.2)
    local versions
    versions=$("$PY" - <<'PY'
import re
def v(s): return tuple(int(x) for x in re.findall(r"\d+", s)[:2])
try:  # before setuptools, which puts its own copy on sys.path
    import packaging; pk = packaging.__version__
except ImportError:
    pk = "none"
try:
    import setuptools; st = setuptools.__version__
except ImportError:
    st = "none"
ok = st != "none" and v(st) >= (77,) and (pk == "none" or v(pk) >= (24, 2))
print(f"{'ok' if ok else 'no'} setuptools {st}, packaging {pk}")
PY
)
    if [ "${versions%% *}" != ok ]; then
        say "${versions#* }: the offline editable install needs setuptools>=77 and, where installed," \
            "packaging>=24.2 (pyproject.toml's PEP 639 license fields); not trying pip"
        return 1
    fi
    say "pip install --no-deps --no-build-isolation --no-index -e . (${versions#* }; no network)"
    if (cd "$REPO" && "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1) \
        && importable "$REPO"; then
        say "editable install ok"
        return 0
    fi
    say "editable install failed (see $LOG); trying --user"
    if (cd "$REPO" && "$PY" -m pip install --user --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1) \
        && importable "$REPO"; then
        say "editable --user install ok"
        return 0
    fi
    return 1
}

shim() {
    # Fallback without pip: a folder whose fused_birnn/ links every file of the checkout's fused_birnn/
    # plus kernels/ as fused_birnn/kernels (what the package-dir mapping does), put on PYTHONPATH. Python
    # then runs from that folder, not from the repo root, whose own fused_birnn/ lacks kernels/.
    local shim="$SCRATCH/.shim"
    rm -rf "$shim" && mkdir -p "$shim/fused_birnn"
    for f in "$REPO"/fused_birnn/*; do
        ln -s "$f" "$shim/fused_birnn/$(basename "$f")"
    done
    ln -s "$REPO/kernels" "$shim/fused_birnn/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$shim"
    if importable "$shim"; then
        say "using the PYTHONPATH shim $shim (running from there)"
        return 0
    fi
    say "FATAL: cannot import fused_birnn.kernels from $REPO (see $LOG)"
    return 1
}

stamp() {
    {
        date -u +%FT%TZ
        nvidia-smi 2>&1 || echo "nvidia-smi: n/a"
        (cd "$RUN_DIR" && "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else None, 'allow_tf32', torch.backends.cudnn.allow_tf32)") 2>&1
        git -C "$REPO" rev-parse HEAD 2>/dev/null || true
    } >"$OUT/env.txt"
    cat "$OUT/env.txt" >>"$LOG"
}

sanitize() {  # the small split forward+backward under compute-sanitizer's racecheck and synccheck
    local cs
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -z "$cs" ]; then
        say "sanitize: compute-sanitizer not found, skipped"
        return 0
    fi
    for tool in racecheck synccheck; do
        run_step "sanitize:$tool" "$cs" --tool "$tool" --error-exitcode 3 "$PY" -m pytest -m cuda \
            "$REPO/tests/test_cuda.py" -q -k sanitizer -p no:cacheprovider >"$OUT/sanitize_$tool.log" 2>&1
        tail -n 15 "$OUT/sanitize_$tool.log" >&2
    done
}

run_step() {  # name, command...: bounded by timeout (STEP_LIMIT, default STEP_TIMEOUT); never aborts the script
    local name=$1
    shift
    say "step $name: $*"
    local t0=$SECONDS rc=0
    (cd "$RUN_DIR" && timeout --signal=INT --kill-after=20 "${STEP_LIMIT:-$STEP_TIMEOUT}" "$@") 2>&1 | tee -a "$LOG" || rc=$?
    say "step $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    return 0
}

bench() {  # suite [dtype]
    local args=(--suite "$1" --device "$DEVICE" --out "$RESULTS" --no-compile)
    [ -n "${2:-}" ] && args+=(--dtype "$2")
    run_step "$1${2:+:$2}" "$PY" -m fused_birnn.bench "${args[@]}"
}

once() {  # the bounded command: env report first, then set-up, then bench/gpu_once.py's steps
    local deadline=$((START_EPOCH + BUDGET)) setup_failed=()
    say "once: budget $BUDGET s (until $(date -d "@$deadline" +%H:%M:%S 2>/dev/null || echo "+$BUDGET s")); work folder $SCRATCH"
    timeout --signal=INT --kill-after=10 240 "$PY" "$REPO/bench/gpu_once.py" env --work "$SCRATCH" --out "$OUT" \
        --device "$DEVICE" --repo "$REPO" 2>&1 | tee -a "$LOG" >&2 || say "env report failed (see above)"
    setup || setup_failed=(--setup-failed)
    (cd "$RUN_DIR" && "$PY" "$REPO/bench/gpu_once.py" run --work "$SCRATCH" --out "$OUT" --device "$DEVICE" \
        --repo "$REPO" --run-dir "$RUN_DIR" --started "$START_EPOCH" --deadline "$deadline" --log "$LOG" \
        ${setup_failed[@]+"${setup_failed[@]}"})
}

find_python
if [ -n "$BUDGET" ]; then
    once
else
    setup || exit 1
    stamp
    for step in "${STEPS[@]}"; do
        case "$step" in
            setup) ;;
            tests)
                run_step tests "$PY" -m pytest -m cuda "$REPO/tests" -q -rs --junitxml="$OUT/tests.xml" \
                    -o cache_dir="$OUT/.pytest_cache" >"$OUT/tests.log" 2>&1
                tail -n 30 "$OUT/tests.log" >&2
                ;;
            sanitize) sanitize ;;
            quick)
                run_step quick "$PY" -m fused_birnn.bench --suite all --device "$DEVICE" --out "$RESULTS" --quick --no-compile ;;
            compile)
                run_step compile "$PY" -m fused_birnn.bench --suite all --compile-only --device "$DEVICE" --out "$RESULTS" \
                    --jobs "$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))" ;;
            all)
                run_step tests "$PY" -m pytest -m cuda "$REPO/tests" -q -rs --junitxml="$OUT/tests.xml" \
                    -o cache_dir="$OUT/.pytest_cache" >"$OUT/tests.log" 2>&1
                [ "${BENCH_SANITIZE:-0}" = 1 ] && sanitize
                for s in seed tagger latency scaling deepbench speech; do bench "$s"; done
                for s in "${LSTM_GRU_SUITES[@]}"; do STEP_LIMIT=$LSTM_GRU_SUITE_TIMEOUT bench "$s"; done
                run_step compile "$PY" -m fused_birnn.bench --suite all --compile-only --device "$DEVICE" --out "$RESULTS" \
                    --jobs "$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))"
                ;;
            lstm-gru)
                for s in "${LSTM_GRU_SUITES[@]}"; do STEP_LIMIT=$LSTM_GRU_SUITE_TIMEOUT bench "$s"; done ;;
            *:*) bench "${step%%:*}" "${step#*:}" ;;
            seed | tagger | latency | scaling | deepbench | speech | tiny) bench "$step" ;;
            pyannote | tacotron2 | openunmix | espnet | deepspeech | deepspeech2 | nemo) bench "$step" ;;
            *) say "unknown step $step (expected once, setup, tests, sanitize, compile, quick, all, lstm-gru, a suite or SUITE:DTYPE)" ;;
        esac
    done
fi

if [ "$DEVICE" = cuda ] && [ -n "$(ls -A "$RESULTS" 2>/dev/null)" ]; then
    mkdir -p "$REPO/bench/results/gpu"
    cp -r "$RESULTS"/. "$REPO/bench/results/gpu/" 2>>"$LOG" || say "could not copy results to bench/results/gpu"
fi
[ -n "$BUDGET" ] && say "done in $(( $(date +%s) - START_EPOCH )) s of $BUDGET: OUT holds $(ls "$OUT" | tr '\n' ' ')" \
    || say "done: $(ls "$RESULTS" | wc -l) files in $RESULTS"
