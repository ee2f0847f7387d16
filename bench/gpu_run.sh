#!/usr/bin/env bash
# What a lent GPU machine runs, end to end, with nothing to install (torch, triton preinstalled; no network).
#
#   bash bench/gpu_run.sh OUTDIR [STEP ...]
#
# STEP: setup | tests | sanitize | compile | quick | all | lstm-gru | a suite (seed tagger latency scaling
#       deepbench speech; LSTM/GRU: pyannote tacotron2 openunmix espnet deepspeech deepspeech2 nemo) |
#       SUITE:DTYPE (e.g. speech:fp16, to split a long suite across commands).
# `lstm-gru` runs the seven LSTM/GRU suites (fused_birnn.LSTM/GRU against nn.LSTM/nn.GRU on cuDNN, fp32,
# fp16, bf16, the workloads' real sizes), each bounded by BENCH_LSTM_GRU_SUITE_TIMEOUT seconds (default 75:
# at most 7 x 75 s = 8.75 min, one GPU-tool command); a suite cut short keeps the configurations it
# finished (fp32 first, then fp16, then bf16).
# `tests` runs the CUDA tests (the split recurrence's among them) and then, where compute-sanitizer exists,
# `sanitize`: the small split test under `compute-sanitizer --tool racecheck` and `--tool synccheck`.
# Default (no STEP): setup tests seed tagger latency scaling deepbench speech compile -- longer than one
# 10-minute command of the GPU tool: there, run a few steps per command, e.g.
#   bash bench/gpu_run.sh "$OUT" tests seed tagger
#   bash bench/gpu_run.sh "$OUT" latency scaling
#   bash bench/gpu_run.sh "$OUT" deepbench
#   bash bench/gpu_run.sh "$OUT" speech:fp32 speech:fp16 speech:bf16
#   bash bench/gpu_run.sh "$OUT" lstm-gru
#   bash bench/gpu_run.sh "$OUT" compile          # needs no GPU: `--compile-only` runs on a CPU machine too
# Every step is bounded by `timeout` (BENCH_STEP_TIMEOUT seconds, default 530) and a step that fails or
# times out does not stop the next ones; a suite writes its JSON after every configuration, so a timed-out
# suite keeps what it measured. Writes under OUTDIR: results/ (JSON, md, PNG per suite), tests.log, sanitize_*.log,
# tests.xml, gpu_run.log, env.txt; and copies results/ to bench/results/gpu/ in the checkout.
set -u -o pipefail

if [ $# -lt 1 ]; then
    sed -n '2,20p' "$0"
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-530}
LSTM_GRU_SUITE_TIMEOUT=${BENCH_LSTM_GRU_SUITE_TIMEOUT:-75}
LSTM_GRU_SUITES=(pyannote tacotron2 openunmix espnet deepspeech deepspeech2 nemo)
DEVICE=${BENCH_DEVICE:-cuda}   # BENCH_DEVICE=cpu: a dry run of this script on a machine without a GPU
PY=${PYTHON:-python}
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
LOG="$OUT/gpu_run.log"
RUN_DIR="$REPO"   # where python runs from; a neutral folder when fused_birnn comes from the shim
export TRITON_INTERPRET=0
export MPLBACKEND=Agg
export PYTHONUNBUFFERED=1

say() { echo "[gpu_run $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

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
    say "python: $(command -v "$PY")"
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
    say "pip install --no-deps --no-build-isolation -e . (needs setuptools>=64, no network)"
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
    local shim="$OUT/.shim"
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

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(all)
setup || exit 1
stamp
for step in "${STEPS[@]}"; do
    case "$step" in
        setup) ;;
        tests)
            run_step tests "$PY" -m pytest -m cuda "$REPO/tests" -q -rs --junitxml="$OUT/tests.xml" \
                -o cache_dir="$OUT/.pytest_cache" >"$OUT/tests.log" 2>&1
            tail -n 30 "$OUT/tests.log" >&2
            sanitize
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
            sanitize
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
        *) say "unknown step $step (expected setup, tests, sanitize, compile, quick, all, lstm-gru, a suite or SUITE:DTYPE)" ;;
    esac
done

if [ "$DEVICE" = cuda ]; then
    mkdir -p "$REPO/bench/results/gpu"
    cp -r "$RESULTS"/. "$REPO/bench/results/gpu/" 2>>"$LOG" || say "could not copy results to bench/results/gpu"
fi
say "done: $(ls "$RESULTS" | wc -l) files in $RESULTS"
