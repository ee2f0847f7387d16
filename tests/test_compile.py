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
returns today, so the test follows the table when it changes; `test_every_kernel_is_covered` makes sure
both `W_hh` paths (all four kernels) stay exercised.
"""

from __future__ import annotations

import os

import pytest
import triton

from fused_birnn.compile_report import KERNELS, CompileCase, analyse_sass, compile_report, cuobjdump_path

TARGETS = (80, 86, 89, 90)
ON_CHIP_SIZES = [(h, dt) for h in (7, 50, 128) for dt in ("float32", "float16", "bfloat16")] + [
    (256, "float16"), (256, "bfloat16"),
    # H not a multiple of 16: masked per-step tiles; the padded W_hh copy keeps these from spilling
    (100, "float16"), (200, "float16"), (200, "bfloat16")]
STREAMED_SIZES = [(256, "float32"), (512, "float32"), (512, "float16"), (512, "bfloat16"),
                  (1760, "float16"), (1760, "bfloat16"),
                  # H not a multiple of 16: narrower streamed tiles keep these from spilling
                  (300, "float16"), (1000, "bfloat16"), (300, "float32")]
BATCHES = (5, 64)
# (H, B, dtype, input precision): every size above in the precision the launchers use by default, plus
# fp32 with TF32 (cuDNN's default, torch.backends.cudnn.allow_tf32)
CASES = [(h, b, dt, "ieee", False) for h, dt in ON_CHIP_SIZES + STREAMED_SIZES for b in BATCHES] + [
    (h, b, "float32", "tf32", False) for h in (7, 50, 100, 128, 200, 256, 300, 512) for b in BATCHES] + [
    # the variable-length (PackedSequence) variants: per-row time indices and activity masks
    (h, 64, dt, prec, True) for h, dt, prec in [(50, "float16", "ieee"), (256, "float16", "ieee"),
                                                 (200, "bfloat16", "ieee"), (128, "float32", "tf32"),
                                                 (50, "float32", "ieee"), (512, "float16", "ieee"),
                                                 (1760, "bfloat16", "ieee"), (512, "float32", "ieee")]]

pytestmark = pytest.mark.skipif(not os.path.exists(cuobjdump_path()),
                                reason="this triton has no NVIDIA backend tools (cuobjdump)")


def _key(h, b, dt, prec, lengths):
    return f"{dt}{'-tf32' if prec == 'tf32' else ''}-H{h}-B{b}{'-lengths' if lengths else ''}"


@pytest.fixture(scope="module")
def report() -> dict[str, list[dict]]:
    """All rows, grouped per case."""
    cases = [CompileCase.make(h, b, dt, input_precision=prec, lengths=lengths, targets=TARGETS)
             for h, b, dt, prec, lengths in CASES]
    rows = compile_report(cases, jobs=2)
    out: dict[str, list[dict]] = {}
    for r in rows:
        key = _key(r["hidden_size"], r["batch_size"], r["dtype"], r["input_precision"], r["lengths"])
        out.setdefault(key, []).append(r)
    return out


def _describe(r: dict) -> str:
    return (f"{r['kernel']} {r['target']} {r['dtype']}/{r['input_precision']} H={r['hidden_size']} "
            f"B={r['batch_size']} config {r['block_b']}x{r['block_h']} {r['w_hh_path']} "
            f"num_warps={r['num_warps']} num_stages={r.get('num_stages')}")


@pytest.mark.parametrize("h,b,dt,prec,lengths", CASES, ids=[_key(*c) for c in CASES])
def test_compiles_fits_no_spills(report, h, b, dt, prec, lengths):
    rows = report[_key(h, b, dt, prec, lengths)]
    # the forward and the backward kernel of the path select_config picks, for every target
    assert sorted((r["arch"], r["kernel"][:9]) for r in rows) == sorted(
        (a, k) for a in TARGETS for k in ("birnn_fwd", "birnn_bwd"))
    failures = []
    for r in rows:
        what = _describe(r)
        if r["error"]:
            failures.append(f"{what}: compile failed: {r['error']}")
            continue
        assert KERNELS[r["kernel"]][1] == (r["w_hh_path"] == "on-chip"), what
        assert r["programs"] == triton.cdiv(b, r["block_b"]) * 2, what
        if not r["fits_shared"]:
            failures.append(f"{what}: shared memory {r['shared']} B > {r['shared_limit']} B per block")
        if r["local_bytes"] or r["stack_bytes"] or r["local_stores"] or r["local_loads"]:
            failures.append(
                f"{what}: spills: {r['registers']} registers, STACK {r['stack_bytes']} B, LOCAL "
                f"{r['local_bytes']} B, {r['local_stores']} STL / {r['local_loads']} LDL "
                f"({r['local_in_loop']} inside a loop)")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("h,b,dt,prec,lengths", CASES, ids=[_key(*c) for c in CASES])
def test_tensor_cores(report, h, b, dt, prec, lengths):
    """fp16/bf16 and TF32 dots run on tensor cores, inside the time loop; exact fp32 ("ieee") must not
    (an HMMA there would be TF32 rounding: parity with fp32 nn.RNN would break)."""
    for r in report[_key(h, b, dt, prec, lengths)]:
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


def test_every_kernel_is_covered(report):
    """Both W_hh paths stay exercised whatever select_config returns for the sizes above."""
    seen = {(r["kernel"], r["arch"]) for rows in report.values() for r in rows}
    assert seen == {(k, a) for k in KERNELS for a in TARGETS}, sorted(seen)


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
