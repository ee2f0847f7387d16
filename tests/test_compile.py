"""The recurrence kernels compile for real GPUs (sm_80, sm_86, sm_89, sm_90), with the triton installed here
(CI runs this file under triton 3.9 and 3.6; under 3.6 the cases of `TRITON_36_GAPS` are known to fail,
strictly), at the plans `select_config` returns for each target
(each planned with the target's own limits: sm_86/sm_89 allow 101,376 B of shared memory per block) and
at forced plans of every kind, and the compiled code is what the design says:

* shared memory within the target's per-block limit;
* no register spill inside a loop (every step would pay it; spills outside the loops, once per launch,
  are reported in the table, `compile_report.SPILL_OUTSIDE_LOOPS`);
* a fully resident plan loads no weight inside a loop (its slice is read from shared memory only: every
  global load located in kernels/product.py, the weights' loads, sits before the time loop); a plan that
  streams chunks does;
* tensor-core MMAs per step: the gate product repeats none across warps, and the time loop's HMMAs times
  the warps equal the useful work with the repeats `config.mma_replication` predicts for a narrow
  projection (fully resident plans exactly); exact fp32 has none (an HMMA would be TF32 rounding);
* for split plans, the barrier's GPU-scope release and acquire and exchange loads that bypass L1.

No GPU is needed: `fused_birnn.compile_report` runs `triton.compile` for a `GPUTarget` in a subprocess
with `TRITON_INTERPRET=0` (this suite runs the interpreter) and reads the cubin with the wheel's
`cuobjdump`. All compiles happen once, in one subprocess with 2 parallel workers, through Triton's on-disk
cache; each test below only looks up its rows. "No spills" counts the stack frame and STL/LDL in the
SASS: ptxas puts register spills in the stack frame, and cuobjdump's `LOCAL` stays 0 for them. The
surveyed workloads' plans at every dtype are compiled by `python -m fused_birnn.bench --suite rnn lstm-gru
--compile-only` (committed under bench/results/compile*/; `test_committed_compile_tables_are_current`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import triton

from fused_birnn.compile_report import KERNELS, CompileCase, analyse_sass, compile_report, cuobjdump_path

TARGETS = (80, 86, 89, 90)
# (name, H, B, dtype, input precision, lengths, forced S, cell, proj_size, plan): the plan the target's
# planner picks unless `plan` (RecurrenceConfig fields) or S (FUSED_BIRNN_SPLIT) is given
CASES = [
    ("seed", 50, 15, "float16", "ieee", False, None, None, 0, None),  # one program, state in registers
    ("pyannote", 128, 32, "float16", "ieee", False, None, "LSTM", 0, None),
    ("pyannote-tf32", 128, 32, "float32", "tf32", False, None, "LSTM", 0, None),
    ("pyannote-fp32", 128, 32, "float32", "ieee", False, None, "LSTM", 0, None),  # FMA dots
    ("tagger-tf32-lengths", 256, 32, "float32", "tf32", True, None, None, 0, None),
    ("espnet-lengths", 320, 30, "float16", "ieee", True, None, "LSTM", 0, None),
    ("deepspeech", 1024, 32, "float16", "ieee", False, None, "LSTM", 0, None),  # "dh"; partial off sm_90
    ("deepspeech2-bf16", 1024, 32, "bfloat16", "ieee", False, None, "GRU", 0, None),
    ("nemo", 2048, 16, "float16", "ieee", False, None, "LSTM", 320, None),  # the projection's K split
    ("deepbench-1760", 1760, 32, "float16", "ieee", False, None, None, 0, None),  # Elman: K split
    ("fp32-split", 512, 64, "float32", "ieee", False, None, None, 0, None),  # FMA streamed split
    ("gru-s3-tf32", 50, 15, "float32", "tf32", False, 3, "GRU", 0, None),
    ("lstm-proj-s2", 50, 15, "float16", "ieee", True, 2, "LSTM", 20, None),
    ("elman-s3-fp32", 33, 5, "float32", "ieee", False, 3, None, 0, None),
    ("partial-dh", 256, 16, "float16", "ieee", True, None, "LSTM", 0,
     dict(block_b=16, block_h=32, w_on_chip=True, num_warps=8, num_warps_forward=4, num_stages=1, split=8,
          block_k=64, block_k_backward=64, exchange="dh", resident_chunks=2, resident_chunks_backward=2,
          persistent=True)),
    ("streamed-dz", 256, 16, "float16", "ieee", False, None, None, 0,
     dict(block_b=16, block_h=32, w_on_chip=False, num_warps=4, num_stages=1, split=8, block_k=32,
          block_k_backward=32, exchange="dz", resident_chunks=0, resident_chunks_backward=0, persistent=True)),
]
IDS = [c[0] for c in CASES]

pytestmark = pytest.mark.skipif(not os.path.exists(cuobjdump_path()),
                                reason="this triton has no NVIDIA backend tools (cuobjdump)")


@pytest.fixture(scope="module")
def report() -> dict[str, list[dict]]:
    """All rows, grouped per case name."""
    cases = [CompileCase.make(h, b, dt, input_precision=prec, lengths=lengths, targets=TARGETS, split=split,
                              cell=cell, proj_size=proj, plan=plan)
             for _, h, b, dt, prec, lengths, split, cell, proj, plan in CASES]
    rows = compile_report(cases, jobs=2, timeout=3000)
    out: dict[str, list[dict]] = {}
    for (name, *_), case in zip(CASES, cases):
        out[name] = [r for r in rows if _same(r, case)]
    return out


def _same(row: dict, case: CompileCase) -> bool:
    cell = case.cell or ("RNN_RELU" if case.relu else "RNN_TANH")
    return (row["hidden_size"], row["batch_size"], row["dtype"], row["input_precision"], row["lengths"],
            row.get("forced_split"), row["cell"], row["proj_size"], row["config_source"] == "plan") == (
        case.hidden_size, case.batch_size, case.dtype, case.input_precision or "ieee", case.lengths, case.split,
        cell, case.proj_size, case.plan is not None)


def _describe(r: dict) -> str:
    return (f"{r['kernel']} {r['cell']}{'-P' + str(r['proj_size']) if r['proj_size'] else ''} {r['target']} "
            f"{r['dtype']}/{r['input_precision']} H={r['hidden_size']} B={r['batch_size']} "
            f"{r['block_b']}x{r['block_h']}x{r['block_k']} {r['w_hh_path']} {r['resident_chunks']}/{r['chunks']} "
            f"S={r['split']}{' persistent' if r['persistent'] else ' per-step'} exchange={r.get('exchange')} "
            f"split_k={r.get('split_k')} num_warps={r['num_warps']}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fits_no_spill_in_the_loop(report, case):
    rows = report[case[0]]
    assert sorted((r["arch"], r["kernel"]) for r in rows) == sorted((a, k) for a in TARGETS for k in KERNELS)
    failures = []
    for r in rows:
        what = _describe(r)
        if r["error"]:
            failures.append(f"{what}: compile failed: {r['error']}")
            continue
        assert r["programs"] == triton.cdiv(r["batch_size"], r["block_b"]) * 2 * r["split"], what
        if case[6]:
            assert r["split"] == case[6], what
        if not r["fits_shared"]:
            failures.append(f"{what}: shared memory {r['shared']} B > {r['shared_limit']} B per block")
        if r["local_in_loop"]:
            failures.append(f"{what}: {r['local_in_loop']} spill instructions inside a loop ({r['registers']} "
                            f"registers, STACK {r['stack_bytes']} B)")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resident_weights_never_loaded_in_the_loop(report, case):
    for r in report[case[0]]:
        what = f"{_describe(r)}: {r['weight_loads']} weight loads, {r['weight_loads_in_loop']} in a loop"
        assert r["weight_loads"] > 0, what
        if r["w_hh_path"] == "resident":
            assert r["weight_loads_in_loop"] == 0, what
        else:
            assert r["weight_loads_in_loop"] > 0, what


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensor_cores_without_repeated_work(report, case):
    """fp16/bf16 and TF32 dots run on tensor cores inside the time loop, the gate product's MMAs on one
    warp each, every MMA as the layout model predicts; exact fp32 ("ieee") has none."""
    _, _, _, dt, prec, *_ = case
    for r in report[case[0]]:
        what = f"{_describe(r)}: {r['tensor_core_ops']}, by loop depth {r['tensor_core_by_depth']}"
        if dt in ("float16", "bfloat16") or prec == "tf32":
            assert r["tensor_core_in_loop"] > 0, what
            if r["arch"] == 80:
                assert set(op.split(".")[0] for op in r["tensor_core_ops"]) == {"HMMA"}, what
            assert r["mma_replication"][0] == 1, what + f" repeats {r['mma_replication']}"
            limit = f"{what}: {r['mma_per_step']} MMAs a step, {r['mma_expected']} expected ({r['mma_useful']} useful)"
            if r["w_hh_path"] == "resident":  # (the GRU's unread padding block may be dropped: `mma_least`)
                assert r["mma_least"] <= r["mma_per_step"] <= r["mma_expected"], limit
            else:  # the streamed chunks' MMAs are in their own loop (or unrolled into this one)
                assert r["mma_per_step"] <= r["mma_expected"], limit
        else:
            assert r["tensor_core"] == 0, what


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_split_barrier_and_exchange_in_the_ptx(report, case):
    """Every split plan (S > 1, in-kernel barrier) has GPU-scope release and acquire operations, and every
    load of the exchange buffer bypasses L1 (volatile or .cg): L1 is not coherent across SMs."""
    for r in report[case[0]]:
        what = (f"{_describe(r)}: release {r['release_ops']}, acquire {r['acquire_ops']}, exchange loads "
                f"{r['exchange_load_ops']}")
        assert not r["exchange_loads_l1"], what + f"; L1-allocating: {r['exchange_loads_l1']}"
        if r["split"] > 1:
            assert r["exchange_loads"] > 0, what
            if r["persistent"]:
                assert r["release_ops"] > 0 and r["acquire_ops"] > 0, what
                if r["proj_size"] and r["kernel"] == "birnn_fwd_kernel":  # m, then h: two barriers a step
                    assert r["release_ops"] >= 4 and r["acquire_ops"] >= 4, what


def test_every_kernel_and_plan_kind_is_covered(report):
    rows = [r for rows in report.values() for r in rows if not r["error"]]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in TARGETS}
    kinds = {(r["w_hh_path"], r["split"] > 1) for r in rows}
    assert {("resident", False), ("resident", True), ("partial", True), ("streamed", True)} <= kinds, kinds
    assert {r["exchange"] for r in rows if r["kernel"] == "birnn_bwd_kernel"} == {"dz", "dh"}
    assert any(max(r["split_k"]) > 1 for r in rows)
    assert any(r["persistent"] and r["split"] > 1 for r in rows)


def test_analyse_ptx_finds_semantics_exchange_and_weight_loads():
    from fused_birnn.compile_report import analyse_ptx, weight_loads

    ptx = """
        .loc 4 9 12, function_name $L__info_string0, inlined_at 1 123 13 // exchange.py:9:12
        @%p46 ld.volatile.global.v4.b32 { %r110 }, [ %rd37 + 0 ];
        @%p47 ld.global.v4.b32 { %r111 }, [ %rd38 + 0 ];
        cp.async.ca.shared.global [ %r1 + 0 ], [ %rd39 + 0 ], 0x4;
        .loc 5 40 3
        ld.global.v4.b32 { %r1 }, [ %rd2 + 0 ];
    $L__BB0_3:
        .loc 1 10 3
        ld.global.b32 %r5, [ %rd1 + 0 ];
        .loc 5 52 3
        ld.global.v4.b32 { %r2 }, [ %rd3 + 0 ];
        .loc 6 30 3
        @%p39 atom.global.gpu.acq_rel.add.u32 %r455, [ %rd154 + 0 ], %r523;
        @%p39 ld.global.gpu.acquire.b32 %r499, [ %rd154 + 0 ];
        @%p39 red.global.gpu.release.add.u32 [ %rd154 + 0 ], %r500;
        @%p40 bra $L__BB0_3;
        .file 1 "/x/kernels/forward.py"
        .file 4 "/x/kernels/exchange.py"
        .file 5 "/x/kernels/product.py"
        .file 6 "/x/kernels/sync.py"
    """
    info = analyse_ptx(ptx, {"exchange.py"})
    assert info["release_ops"] == 2 and info["acquire_ops"] == 2
    assert info["exchange_loads"] == 3
    assert info["exchange_loads_l1"] == ["cp.async.ca.shared.global", "ld.global.v4.b32"]
    assert weight_loads(ptx, {"product.py"}) == dict(weight_loads=2, weight_loads_in_loop=1)


def test_analyse_sass_finds_loops():
    """Tensor-core and local-memory instructions are located relative to backward branches; a branch back
    from out-of-line code (placed after the loop, returning into its middle) is not a loop."""
    sass = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   STL [R1], R4 ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/                   BRA.DIV ~URZ, 0x90 ;
        /*0050*/                   LDL R4, [R1] ;
        /*0060*/              @!P1 BRA P3, 0x30 ;
        /*0070*/                   HGMMA.64x64x16.F32 gdesc[UR4], R24 ;
        /*0080*/                   EXIT ;
        /*0090*/                   SHFL.IDX R2, R3, R4, R5 ;
        /*00a0*/                   BRA 0x50 ;
        /*00b0*/                   BRA 0xb0;
    """
    info = analyse_sass(sass)
    assert info["tensor_core"] == 3 and info["tensor_core_in_loop"] == 1
    assert info["tensor_core_loop_depth"] == 1 and info["loops"] == 1 and info["tensor_core_by_depth"] == {"0": 2, "1": 1}
    assert info["local_stores"] == 1 and info["local_loads"] == 1 and info["local_in_loop"] == 1


def test_table_shows_split_plans_and_labels_the_estimate():
    """`--compile-only` prints each plan's S, programs against SMs and estimated time per step, labelled
    as an estimate."""
    import torch

    from fused_birnn.compile_report import format_table
    from fused_birnn.kernels.config import DeviceLimits, estimate_step_us, select_config

    h100 = DeviceLimits.for_arch(90)
    cfg = select_config(1760, 32, torch.float16, False, h100)
    est = estimate_step_us(cfg, 1760, 32, torch.float16, False, h100)
    row = dict(kernel="birnn_fwd_kernel", target="sm_90", arch=90, dtype="float16", input_precision="ieee",
               hidden_size=1760, batch_size=32, w_hh_path="resident", split=cfg.programs_per_group(1760),
               persistent=True, block_b=cfg.block_b, block_h=cfg.block_h, block_k=cfg.k_block(1760),
               num_warps=4, num_stages=1, programs=est["programs"], sms=132, estimate_us_per_step=est["us"],
               registers=100, spill_bytes=0, shared=24576, shared_limit=232448, fits_shared=True,
               tensor_core=8, tensor_core_in_loop=8, tensor_core_loop_depth=1, tensor_core_ops={"HMMA.16816": 8},
               release_ops=2, acquire_ops=2, compile_s=1.0, error=None, problems=[], resident_chunks=28,
               chunks=28, exchange=None)
    text = format_table([row])
    assert f"{cfg.programs_per_group(1760)} persist" in text and f"{est['programs']}/132" in text
    assert f"~{est['us']:.2f}" in text and "ESTIMATE" in text and "not a measurement" in text
    assert "28/28" in text


COMMITTED = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_committed_compile_tables_are_current():
    """The committed `--compile-only` tables (bench/results/compile*/) are the evidence for every surveyed
    plan: each row's plan is what the planner returns today for its target under the triton that compiled
    the table, and none has a problem. A
    planner change without a new table fails here (rerun the command in bench/README.md)."""
    import torch

    from fused_birnn.kernels.config import DeviceLimits, select_config

    # a table holds the plans of the triton that compiled it (kernels/config.py: LEGACY_TRITON)
    version = ".".join(triton.__version__.split(".")[:2])
    tables = [json.loads(f.read_text()) for f in sorted(COMMITTED.glob("compile*/*.json"))]
    rows = [c for t in tables if ".".join(t["env"]["triton"].split(".")[:2]) == version
            for r in t.get("results", []) for c in (r.get("compile") or [])]
    if not rows:
        pytest.skip(f"no committed compile table from triton {version}")
    for r in rows:
        cell = r["cell"] if r["cell"] in ("LSTM", "GRU") else None
        dtype = getattr(torch, r["dtype"])
        cfg = select_config(r["hidden_size"], r["batch_size"], dtype, r["input_precision"] == "tf32",
                            DeviceLimits.for_arch(r["arch"]), None, cell, r["proj_size"] or None)
        what = f"{_describe(r)} (the planner now: {cfg})"
        assert (cfg.programs_per_group(r["hidden_size"]), cfg.block_b, cfg.block_h) == (
            r["split"], r["block_b"], r["block_h"]), what
        assert cfg.warps(r["kernel"].startswith("birnn_fwd")) == r["num_warps"], what
        assert not r["problems"], what + f": {r['problems']}"
