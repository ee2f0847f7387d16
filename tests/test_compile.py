"""The recurrence kernels compile for real GPUs (sm_80, sm_86, sm_89, sm_90) at every configuration
`select_config` can return for that target (each planned with the target's own limits: sm_86/sm_89 allow
101,376 B of shared memory per block), fit the target's shared memory, do not spill, and use tensor cores
where they should.

No GPU is needed: `fused_birnn.compile_report` runs `triton.compile` for a `GPUTarget` in a subprocess
with `TRITON_INTERPRET=0` (this suite runs the interpreter) and reads the cubin with the wheel's
`cuobjdump`. All compiles happen once, in one subprocess with 2 parallel workers, through Triton's
on-disk cache; each test below only looks up its row.

"No spills" means no stack frame and no local-memory instruction at all: ptxas puts register spills in
the stack frame (cuobjdump `STACK`, `STL`/`LDL` in the SASS); cuobjdump's `LOCAL` stays 0 for them, so
`LOCAL == 0` alone would pass a kernel that spills kilobytes. Configurations are whatever `select_config`
returns today (or with S forced, as `FUSED_BIRNN_SPLIT` does), so the test follows the plan when it
changes; `test_every_kernel_and_path_is_covered` makes sure one and several programs per group, on-chip
and streamed `W_hh` slices stay exercised. For every split configuration the PTX must show the barrier's
GPU-scope release and acquire operations and exchange-buffer loads that bypass L1.
"""

from __future__ import annotations

import os

import pytest
import triton

from fused_birnn.compile_report import KERNELS, CompileCase, analyse_sass, compile_report, cuobjdump_path

TARGETS = (80, 86, 89, 90)
# (H, B, dtype, input precision, lengths, forced S): the plan's choice at each size unless S is given
# (FUSED_BIRNN_SPLIT). One program per group on chip at small H; S cooperating programs (on-chip or
# streamed W_hh slices) above; fp32 with TF32 is cuDNN's default (torch.backends.cudnn.allow_tf32).
CASES = [
    # one program per group (sm_86/sm_89 plan H=256 16-bit as a split: 139,264 B do not fit there)
    (7, 5, "float32", "ieee", False, None), (50, 15, "float16", "ieee", False, None),
    (50, 15, "float32", "tf32", False, None), (128, 64, "float16", "ieee", False, None),
    (128, 64, "float32", "tf32", False, None), (256, 32, "float16", "ieee", False, None),
    (256, 64, "bfloat16", "ieee", False, None), (100, 5, "float16", "ieee", False, None),
    (200, 64, "bfloat16", "ieee", False, None), (100, 15, "float32", "tf32", False, None),
    # split plans
    (256, 32, "float32", "tf32", False, None), (512, 8, "float16", "ieee", False, None),
    (512, 64, "bfloat16", "ieee", False, None), (1024, 32, "float16", "ieee", False, None),
    (1760, 32, "float16", "ieee", False, None), (2560, 32, "float16", "ieee", False, None),
    (300, 32, "float16", "ieee", False, None), (1000, 5, "bfloat16", "ieee", False, None),
    (128, 64, "float32", "ieee", False, None), (512, 64, "float32", "ieee", False, None),
    (300, 15, "float32", "tf32", False, None),
    # the variable-length (PackedSequence) variants: per-row time indices and activity masks
    (50, 64, "float16", "ieee", True, None), (256, 64, "float16", "ieee", True, None),
    (256, 32, "float32", "tf32", True, None), (1760, 32, "bfloat16", "ieee", True, None),
    (512, 64, "float32", "ieee", True, None),
    # S forced (FUSED_BIRNN_SPLIT): 2 and 3 programs at odd sizes
    (50, 15, "float16", "ieee", False, 2), (50, 15, "float32", "tf32", True, 3),
    (33, 5, "float32", "ieee", False, 3), (200, 32, "bfloat16", "ieee", False, 3),
]


# The gated cells' kernels (CELL specialisation, each planned with its cell) at the surveyed workloads'
# shapes (shared/research/lstm-gru.md): (cell, proj_size, H, B, dtype, precision, lengths, forced S)
GATED_CASES = [
    ("LSTM", 0, 128, 32, "float16", "ieee", False, None),  # pyannote
    ("LSTM", 0, 128, 32, "float32", "tf32", False, None),
    ("LSTM", 0, 128, 32, "float32", "ieee", False, None),  # exact fp32: FMA dots, no tensor cores
    ("LSTM", 0, 256, 16, "float16", "ieee", False, None),  # Open-Unmix
    ("LSTM", 0, 1024, 32, "float16", "ieee", False, None),  # deepspeech.pytorch
    ("LSTM", 320, 2048, 16, "float16", "ieee", False, None),  # NeMo LSTM-CTC
    ("GRU", 0, 1024, 32, "float16", "ieee", False, None),  # DeepSpeech2
    ("LSTM", 0, 320, 64, "float16", "ieee", True, None),  # ESPnet, packed
    ("LSTM", 0, 512, 16, "bfloat16", "ieee", False, None),  # Demucs
    ("LSTM", 20, 50, 15, "float16", "ieee", False, 2),  # odd sizes, the projection's two exchanges
    ("GRU", 0, 50, 15, "float32", "tf32", False, 3),
]


def _key(h, b, dt, prec, lengths, split=None, cell=None, proj=0):
    return (f"{dt}{'-tf32' if prec == 'tf32' else ''}-H{h}-B{b}{'-lengths' if lengths else ''}"
            f"{f'-S{split}' if split else ''}{f'-{cell}' if cell in ('LSTM', 'GRU') else ''}"
            f"{f'-P{proj}' if proj else ''}")


def _gated_key(cell, proj, h, b, dt, prec, lengths, split):
    return _key(h, b, dt, prec, lengths, split, cell, proj)


pytestmark = pytest.mark.skipif(not os.path.exists(cuobjdump_path()),
                                reason="this triton has no NVIDIA backend tools (cuobjdump)")


@pytest.fixture(scope="module")
def report() -> dict[str, list[dict]]:
    """All rows, grouped per case."""
    cases = [CompileCase.make(h, b, dt, input_precision=prec, lengths=lengths, targets=TARGETS, split=split)
             for h, b, dt, prec, lengths, split in CASES]
    cases += [CompileCase.make(h, b, dt, input_precision=prec, lengths=lengths, targets=TARGETS, split=split,
                               cell=cell, proj_size=proj)
              for cell, proj, h, b, dt, prec, lengths, split in GATED_CASES]
    rows = compile_report(cases, jobs=2)
    out: dict[str, list[dict]] = {}
    for r in rows:
        key = _key(r["hidden_size"], r["batch_size"], r["dtype"], r["input_precision"], r["lengths"],
                   r.get("forced_split"), r.get("cell"), r.get("proj_size"))
        out.setdefault(key, []).append(r)
    return out


def _describe(r: dict) -> str:
    return (f"{r['kernel']} {r.get('cell', '')}{'-P' + str(r['proj_size']) if r.get('proj_size') else ''} {r['target']} {r['dtype']}/{r['input_precision']} H={r['hidden_size']} "
            f"B={r['batch_size']} config {r['block_b']}x{r['block_h']}x{r['block_k']} {r['w_hh_path']} "
            f"S={r['split']}{' persistent' if r['persistent'] else ' per-step'} "
            f"num_warps={r['num_warps']} num_stages={r.get('num_stages')}")


@pytest.mark.parametrize("h,b,dt,prec,lengths,split", CASES, ids=[_key(*c) for c in CASES])
def test_compiles_fits_no_spills(report, h, b, dt, prec, lengths, split):
    rows = report[_key(h, b, dt, prec, lengths, split)]
    # the forward and the backward kernel of the path select_config picks, for every target
    assert sorted((r["arch"], r["kernel"][:9]) for r in rows) == sorted(
        (a, k) for a in TARGETS for k in ("birnn_fwd", "birnn_bwd"))
    _check_fits_no_spills(rows, b, split)


@pytest.mark.parametrize("cell,proj,h,b,dt,prec,lengths,split", GATED_CASES,
                         ids=[_gated_key(*c) for c in GATED_CASES])
def test_gated_compiles_fits_no_spills(report, cell, proj, h, b, dt, prec, lengths, split):
    """The LSTM (proj_size) and GRU forward and backward at every target, planned with the cell
    (`select_config(..., cell, proj_size)`): fits, no spills, tensor cores in the time loop where they
    should be, the barrier's release/acquire (two exchanges a step with a projection) and L1-bypassing
    exchange loads."""
    rows = report[_gated_key(cell, proj, h, b, dt, prec, lengths, split)]
    assert sorted((r["arch"], r["kernel"]) for r in rows) == sorted(
        (a, k) for a in TARGETS for k in ("birnn_fwd_kernel", "birnn_bwd_kernel"))
    assert all(r["cell"] == cell and r["proj_size"] == proj for r in rows)
    _check_fits_no_spills(rows, b, split)
    _check_tensor_cores(rows, dt, prec)
    _check_barrier_and_exchange(rows)
    for r in rows:  # a projected forward step meets its group twice: m, then h (kernels/forward.py)
        if proj and r["kernel"] == "birnn_fwd_kernel" and r["split"] > 1 and r["persistent"] and not r["error"]:
            assert r["release_ops"] >= 4 and r["acquire_ops"] >= 4, _describe(r)


def _check_fits_no_spills(rows, b, split):
    failures = []
    for r in rows:
        what = _describe(r)
        if r["error"]:
            failures.append(f"{what}: compile failed: {r['error']}")
            continue
        assert r["programs"] == triton.cdiv(b, r["block_b"]) * 2 * r["split"], what
        if split:
            assert r["split"] == split, what
        if not r["fits_shared"]:
            failures.append(f"{what}: shared memory {r['shared']} B > {r['shared_limit']} B per block")
        if r["local_bytes"] or r["stack_bytes"] or r["local_stores"] or r["local_loads"]:
            failures.append(
                f"{what}: spills: {r['registers']} registers, STACK {r['stack_bytes']} B, LOCAL "
                f"{r['local_bytes']} B, {r['local_stores']} STL / {r['local_loads']} LDL "
                f"({r['local_in_loop']} inside a loop)")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("h,b,dt,prec,lengths,split", CASES, ids=[_key(*c) for c in CASES])
def test_tensor_cores(report, h, b, dt, prec, lengths, split):
    """fp16/bf16 and TF32 dots run on tensor cores, inside the time loop; exact fp32 ("ieee") must not
    (an HMMA there would be TF32 rounding: parity with fp32 nn.RNN would break)."""
    _check_tensor_cores(report[_key(h, b, dt, prec, lengths, split)], dt, prec)


def _check_tensor_cores(rows, dt, prec):
    for r in rows:
        if r["error"]:
            pytest.fail(f"{_describe(r)}: compile failed: {r['error']}")
        what = f"{_describe(r)}: tensor-core instructions {r['tensor_core_ops']}"
        if dt in ("float16", "bfloat16") or prec == "tf32":
            assert r["tensor_core"] > 0, what
            assert r["tensor_core_in_loop"] > 0, what + " (none inside the time loop)"
            if r["arch"] == 80:
                assert set(op.split(".")[0] for op in r["tensor_core_ops"]) == {"HMMA"}, what
        else:
            assert r["tensor_core"] == 0, what


@pytest.mark.parametrize("h,b,dt,prec,lengths,split", CASES, ids=[_key(*c) for c in CASES])
def test_split_barrier_and_exchange_in_the_ptx(report, h, b, dt, prec, lengths, split):
    """Every split configuration (S > 1, in-kernel barrier) has GPU-scope release and acquire operations,
    and every load of the exchange buffer bypasses L1 (volatile or .cg): L1 is not coherent across SMs.
    No configuration reads the exchange buffer through an L1-allocating load."""
    _check_barrier_and_exchange(report[_key(h, b, dt, prec, lengths, split)])


def _check_barrier_and_exchange(rows):
    for r in rows:
        if r["error"]:
            pytest.fail(f"{_describe(r)}: compile failed: {r['error']}")
        what = (f"{_describe(r)}: release {r['release_ops']}, acquire {r['acquire_ops']}, exchange loads "
                f"{r['exchange_load_ops']}")
        assert not r["exchange_loads_l1"], what + f"; L1-allocating: {r['exchange_loads_l1']}"
        if r["split"] > 1:
            assert r["exchange_loads"] > 0, what
            if r["persistent"]:
                assert r["release_ops"] > 0 and r["acquire_ops"] > 0, what
        elif r["w_hh_path"] == "on-chip":  # one program per group: no exchange, no barrier
            assert r["release_ops"] == r["acquire_ops"] == 0, what


def test_every_kernel_and_path_is_covered(report):
    """Both kernels, both W_hh paths, one and several programs, both step modes' barrier variants."""
    rows = [r for rows in report.values() for r in rows]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in TARGETS}
    assert {(r["w_hh_path"], r["split"] > 1) for r in rows} == {("on-chip", False), ("on-chip", True),
                                                                  ("streamed", True)}
    assert any(r["persistent"] and r["split"] > 1 for r in rows)


def test_analyse_ptx_finds_semantics_and_exchange_loads():
    from fused_birnn.compile_report import analyse_ptx

    ptx = """
        .loc 4 9 12, function_name $L__info_string0, inlined_at 1 123 13 // exchange.py:9:12
        @%p46 ld.volatile.global.v4.b32 { %r110 }, [ %rd37 + 0 ];
        @%p47 ld.global.v4.b32 { %r111 }, [ %rd38 + 0 ];
        cp.async.ca.shared.global [ %r1 + 0 ], [ %rd39 + 0 ], 0x4;
        .loc 1 10 3
        ld.global.b32 %r5, [ %rd1 + 0 ];
        @%p39 atom.global.gpu.acq_rel.add.u32 %r455, [ %rd154 + 0 ], %r523;
        @%p39 ld.global.gpu.acquire.b32 %r499, [ %rd154 + 0 ];
        @%p39 red.global.gpu.release.add.u32 [ %rd154 + 0 ], %r500;
        .file 1 "/x/kernels/forward.py"
        .file 4 "/x/kernels/exchange.py"
    """
    info = analyse_ptx(ptx, {"exchange.py"})
    assert info["release_ops"] == 2 and info["acquire_ops"] == 2
    assert info["exchange_loads"] == 3
    assert info["exchange_loads_l1"] == ["cp.async.ca.shared.global", "ld.global.v4.b32"]


def test_analyse_sass_finds_loops():
    """Tensor-core and local-memory instructions are located relative to backward branches."""
    sass = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   STL [R1], R4 ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/                   LDL R4, [R1] ;
        /*0050*/              @!P0 BRA 0x30 ;
        /*0060*/                   HGMMA.64x64x16.F32 gdesc[UR4], R24 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    info = analyse_sass(sass)
    assert info["tensor_core"] == 3 and info["tensor_core_in_loop"] == 1
    assert info["tensor_core_loop_depth"] == 1 and info["loops"] == 1
    assert info["local_stores"] == 1 and info["local_loads"] == 1 and info["local_in_loop"] == 1


def test_table_shows_split_plans_and_labels_the_estimate():
    """`--compile-only` prints each plan's S, programs against SMs and estimated time per step, labelled
    as an estimate; the cost model's parts add up to its total."""
    import torch

    from fused_birnn.compile_report import format_table
    from fused_birnn.kernels.config import DeviceLimits, estimate_step_us, select_config

    h100 = DeviceLimits.for_arch(90)
    cfg = select_config(1760, 32, torch.float16, False, h100)
    est = estimate_step_us(cfg, 1760, 32, torch.float16, False, h100)
    assert est["estimate"] is True and est["programs"] == cfg.programs(1760, 32)
    assert est["us"] >= max(est["smem_us"], est["l2_us"], est["mma_us"]) + est["latency_us"] - 0.01
    row = dict(kernel="birnn_fwd_kernel", target="sm_90", arch=90, dtype="float16", input_precision="ieee",
               hidden_size=1760, batch_size=32, w_hh_path="streamed", split=cfg.programs_per_group(1760),
               persistent=True, block_b=cfg.block_b, block_h=cfg.block_h, block_k=cfg.k_block(1760),
               num_warps=4, num_stages=1, programs=est["programs"], sms=132, estimate_us_per_step=est["us"],
               registers=100, spill_bytes=0, shared=24576, shared_limit=232448, fits_shared=True,
               tensor_core=8, tensor_core_in_loop=8, tensor_core_loop_depth=2, tensor_core_ops={"HMMA.16816": 8},
               release_ops=2, acquire_ops=2, compile_s=1.0, error=None, problems=[])
    text = format_table([row])
    assert f"{cfg.programs_per_group(1760)} persist" in text and f"{est['programs']}/132" in text
    assert f"~{est['us']:.2f}" in text and "ESTIMATE" in text and "not a measurement" in text
