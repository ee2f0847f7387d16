#!/usr/bin/env bash
# CI: the oldest stack we claim, besides the current one: triton 3.6.0 (the lent GPU machines' version) with
# numpy 2.4, in a second virtual environment (the CPU torch wheel serves both). Runs the interpreter tests
# that cover every kernel file (the kernel-level tests, the split recurrence, every plan kind), the launch
# plans, and the compile checks of every plan for sm_80/86/89/90 under that triton's compiler.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

python -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --no-compile torch==2.13.0 triton==3.6.0 "numpy==2.4.*"  # the CPU wheel first
"$VPY" -m pip install --no-compile -e "$ROOT" pytest  # keeps triton 3.6.0 and numpy 2.4 (they satisfy the bounds)
"$VPY" -m pip list --format=freeze | grep -i -E '^(fused.birnn|torch|triton|numpy)=' || true
"$VPY" - <<'PY'
import numpy, triton
assert triton.__version__ == "3.6.0" and numpy.__version__.startswith("2.4."), (triton.__version__, numpy.__version__)
PY
echo "oldest stack: venv ready after $((SECONDS - t0)) s"

cd "$ROOT"
TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_gated.py tests/test_kernels_gated_backward.py tests/test_split.py \
    tests/test_plan_kinds.py tests/test_plans.py tests/test_compile.py
echo "oldest stack (triton 3.6.0, numpy 2.4) passed in $((SECONDS - t0)) s"
