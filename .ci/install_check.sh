#!/usr/bin/env bash
# CI: a plain (non-editable, no extras) install works. Builds a wheel of this checkout, installs it into a
# fresh virtual environment (the CPU torch wheel first: a bare `torch` requirement pulls a multi-GB CUDA
# build), then, from a folder outside the checkout, runs the seed forward on both backends with and
# without TRITON_INTERPRET=1, and the bench's smallest suite (which re-runs itself under the interpreter).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 't=$SECONDS; rm -rf "$WORK"; echo "install check: cleaned up in $((SECONDS - t)) s"' EXIT
t0=$SECONDS

# build from a copy of the files git would commit (no stale build/ folder of a local checkout)
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$WORK/src")
python -m pip wheel --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
python - "$WORK"/dist/fused_birnn-*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ("fused_birnn/kernels/forward.py", "fused_birnn/bench/cli.py", "fused_birnn/tune/__main__.py",
             ".dist-info/licenses/LICENSE"):
    assert any(n.endswith(want) for n in names), f"{want} missing from the wheel: {names}"
print(f"wheel: {len(names)} files, kernels, bench, tune and LICENSE included")
PY
echo "install check: wheel built after $((SECONDS - t0)) s"
python -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --no-compile torch==2.13.0  # no .pyc of all of torch: faster in and out
"$VPY" -m pip install --no-compile "$WORK"/dist/fused_birnn-*.whl
"$VPY" -m pip list --format=freeze | grep -i -E '^(fused.birnn|torch|triton|numpy|tqdm|matplotlib|onnx)' || true
"$VPY" -m pip check

echo "install check: venv ready after $((SECONDS - t0)) s"
mkdir "$WORK/run"
cd "$WORK/run"  # outside the checkout: only the installed wheel can be imported
cp "$ROOT/.ci/install_check.py" .
env -u TRITON_INTERPRET "$VPY" -I install_check.py torch auto
TRITON_INTERPRET=1 "$VPY" -I install_check.py triton torch auto
echo "install check: seed forward checked after $((SECONDS - t0)) s"
# the main job's smallest suite, no --out: it must write into a fresh folder here and say where
env -u TRITON_INTERPRET "$VPY" -I -m fused_birnn.bench --suite tiny --quick --no-compile | tee bench.log
grep -q "results go to $WORK/run/fused_birnn-results/cpu-" bench.log
ls fused_birnn-results/cpu-*/tiny_quick.json fused_birnn-results/cpu-*/tiny_quick.md
echo "install check passed in $((SECONDS - t0)) s"
