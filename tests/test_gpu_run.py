"""`bash bench/gpu_run.sh OUT once`, the one bounded GPU command, dry-run on a CPU (`BENCH_DEVICE=cpu`) with a
tiny budget: planted tests (fast ones, a failure, one that sleeps past the budget, a 'long_sequence' one
for the last step) split over two pytest processes, then two suites, the first cut by its share. Checked:
the run ends within its budget; OUT holds four flat files (what the GPU tool can return); the environment
report comes first; the shards are disjoint and cover the selection; a step cut by the budget keeps its
finished results and the steps after it still run; a `python` without torch on PATH is passed over for
`python3`. Plus the budget arithmetic and the split, without processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fused_birnn.bench.suites import get_suite

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_once = _load("gpu_once")
shard = _load("gpu_once_shard")

PLANTED = '''
import time

import pytest

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("i", range(6))
def test_quick(i):
    pass


def test_fails():
    assert 1 == 2, "planted failure"


def test_sleeps_past_the_budget():
    time.sleep(600)


def test_long_sequence_runs_last():
    pass
'''


@pytest.fixture(scope="module")
def once_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_run")
    planted = root / "planted"
    planted.mkdir()
    (planted / "conftest.py").write_text('def pytest_configure(config):\n'
                                         '    config.addinivalue_line("markers", "cuda: planted")\n')
    (planted / "test_planted.py").write_text(PLANTED)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").write_text('#!/bin/sh\necho "a python without torch" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    tmp = root / "tmp"
    tmp.mkdir()
    out = root / "out"
    budget = 110
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TRITON_INTERPRET")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TMPDIR=str(tmp), BENCH_DEVICE="cpu",
               BENCH_TEST_JOBS="2", BENCH_ONCE_TESTS=str(planted / "test_planted.py"),
               BENCH_ONCE_LAST="long_sequence", BENCH_ONCE_TESTS_S="14", BENCH_ONCE_LAST_S="8",
               BENCH_ONCE_SUITES="scaling=15 tiny:quick=40")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), str(out), f"once:{budget}"],
                          capture_output=True, text=True, env=env, timeout=budget + 120)
    wall = time.monotonic() - t0
    extracted = root / "extracted"
    with tarfile.open(out / gpu_once.TARBALL) as tar:
        tar.extractall(extracted, filter="data")
    return dict(proc=proc, wall=wall, budget=budget, out=out, work=extracted / "gpu_run", tmp=tmp,
                bin=bin_dir)


def test_once_ends_within_its_budget_with_a_handful_of_flat_files(once_run):
    proc, out = once_run["proc"], once_run["out"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert once_run["wall"] <= once_run["budget"] + 10, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_once.OUT_FILES)
    assert all(p.is_file() and p.stat().st_size < 16 << 20 for p in out.iterdir())
    assert not list(once_run["tmp"].iterdir()), "the work folder outside OUT is removed"


def test_environment_report_comes_first_and_names_what_triton_needs(once_run):
    env_txt = (once_run["out"] / "env.txt").read_text()
    for what in ("torch:", "triton", "numpy", "setuptools", "C compiler:", "Python.h:", "compute-sanitizer:",
                 "pytest"):
        assert what in env_txt, what
    assert f"at {sys.executable}" in env_txt  # python3 from PATH, not the `python` without torch
    log = (once_run["out"] / "gpu_run.log").read_text()
    assert f"python: {once_run['bin']}/python3" in log
    # the environment report, then the set-up (however it made the package importable), then the steps
    assert log.index("C compiler:") < log.index("] python: ") < log.index("step tests:")


def _steps(once_run) -> dict:
    return {s["name"]: s for s in json.loads((once_run["work"] / "steps.json").read_text())}


def test_steps_in_order_each_within_its_share(once_run):
    steps = _steps(once_run)
    assert list(steps) == ["tests", "tests-last", "suite scaling", "suite tiny:quick"]
    assert steps["tests"]["status"] == "cut by the budget"  # the planted sleep
    assert steps["tests-last"]["status"] == "done"
    assert steps["suite scaling"]["status"] == "cut by the budget"  # 7 configurations, >= 2 s of timing each
    assert steps["suite tiny:quick"]["status"] == "done"  # a cut step does not stop the next
    for s in steps.values():
        assert s["ran_s"] <= s["given_s"] + 2, s


def test_a_cut_test_step_keeps_every_finished_test(once_run):
    res = gpu_once.read_outcomes(once_run["work"] / "tests", "shard*")
    outcome = res["outcome"]
    planted = [n for n in outcome if "test_planted.py" in n]
    assert len(planted) == 8 and not any("long_sequence" in n for n in planted)  # 6 quick, fails, sleeps
    assert outcome[next(n for n in planted if n.endswith("test_fails"))] == "failed"
    assert "planted failure" in res["message"][next(n for n in planted if n.endswith("test_fails"))]
    assert outcome[next(n for n in planted if n.endswith("test_sleeps_past_the_budget"))] == "cut"
    quick = [o for n, o in outcome.items() if "test_quick" in n]
    assert quick.count("passed") >= 3 and set(quick) <= {"passed", "not run"}  # after the sleeper: not run
    ids = [set((once_run["work"] / "tests" / f"shard{i}.ids").read_text().split()) for i in range(2)]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and ids[0] | ids[1] == set(planted)
    last = gpu_once.read_outcomes(once_run["work"] / "tests", "last")["outcome"]
    assert list(last.values()) == ["passed"] and "long_sequence" in next(iter(last))
    summary = (once_run["out"] / "summary.md").read_text()
    assert "FAILED `" in summary and "planted failure" in summary and "CUT `" in summary


def test_a_cut_suite_keeps_what_it_measured_and_the_next_suite_completes(once_run):
    results = once_run["work"] / "results"
    tiny = json.loads((results / "tiny_quick.json").read_text())
    assert not tiny["partial"] and "interrupted" not in tiny and len(tiny["results"]) == 3
    scaling = results / "scaling.json"
    if scaling.exists():  # absent only if the cut came before the bench had started its first configuration
        payload = json.loads(scaling.read_text())
        assert "interrupted" in payload and len(payload["results"]) < len(get_suite("scaling", "cpu"))
    summary = (once_run["out"] / "summary.md").read_text()
    assert "## Suite `tiny_quick` (done)" in summary and "| config | parity |" in summary


# ------------------------------------------------------------------------------ without processes
def test_each_step_gets_its_share_of_what_is_left():
    steps = gpu_once.plan({"BENCH_ONCE_SUITES": "tagger pyannote=30 deepbench:quick:fp16"})
    assert [(s.name, s.share) for s in steps] == [("tests", 210), ("tests-last", 90), ("suite tagger", 60),
                                                  ("suite pyannote", 30), ("suite deepbench:quick:fp16", 60)]
    assert steps[-1].quick and steps[-1].dtypes == ("fp16",)
    assert gpu_once.time_for(steps, 0, 450) == pytest.approx(450 * 210 / 450)
    assert gpu_once.time_for(steps, 2, 300) == pytest.approx(300 * 60 / 150)  # earlier steps ended early
    assert gpu_once.time_for(steps, 4, -5) == 0
    assert [s.kind for s in gpu_once.plan({"BENCH_ONCE_LAST": "", "BENCH_ONCE_SUITES": ""})] == ["tests"]
    with pytest.raises(ValueError, match="DTYPE"):
        gpu_once.parse_suites("tagger:fp8", 60)


def test_shards_are_disjoint_balanced_and_the_same_in_every_process():
    ids = [f"tests/test_cuda.py::test_parity[{i}]" for i in range(20)] + [
        "tests/test_cuda_lstm_gru.py::test_compile_fullgraph_on_gpu[LSTM]",
        "tests/test_cuda_lstm_gru.py::test_compile_fullgraph_on_gpu[GRU]"]
    owner = shard.assign(ids, 4)
    assert owner == shard.assign(list(ids), 4) and set(owner) == {0, 1, 2, 3}
    load = [sum(shard.weight(n) for n, o in zip(ids, owner) if o == s) for s in range(4)]
    assert max(load) - min(load) <= max(shard.weight(n) for n in ids)
    assert owner[-1] != owner[-2]  # the two heaviest apart


def test_environment_warnings_name_what_will_fail():
    env = dict(device="cuda", c_compiler=None, python_h="/usr/include/python3.12/Python.h", python_h_exists=False,
               torch={"error": "ImportError: libcuda.so.1"}, triton_smoke="exit 1: RuntimeError",
               packages=dict(setuptools="68.1.2", packaging="23.2", triton="3.6.0", numpy="2.5.2", pytest=None,
                             expecttest=None))
    text = "\n".join(gpu_once.env_warnings(env))
    for what in ("no C compiler", "Python.h is missing", "torch sees no CUDA device", "smoke kernel failed",
                 "pytest is not installed", "expecttest", "setuptools 68.1.2", ">= 77", "numpy 2.5.2",
                 "packaging >= 24.2"):
        assert what in text, what
    fine = dict(env, c_compiler="/usr/bin/gcc", python_h_exists=True, torch={"cuda_available": True},
                triton_smoke="first launch 1.20 s (compile + launcher build), second 0.0001 s, result ok",
                packages=dict(setuptools="81.0.0", packaging=None, triton="3.6.0", numpy="2.3.5", pytest="9.0",
                              expecttest="0.3"))
    assert gpu_once.env_warnings(fine) == []
    old_packaging = dict(fine, packages=dict(fine["packages"], setuptools="84.2.1", packaging="23.2"))
    assert "packaging 23.2" in "".join(gpu_once.env_warnings(old_packaging))
