"""Compile the recurrence kernels for real GPUs without one, and report what the GPU would get.

For every case (hidden size, batch size, dtype, configuration) and every target (sm_80, sm_86, sm_89,
sm_90 by default) this compiles the forward and backward recurrence kernels (`birnn_fwd_kernel`,
`birnn_bwd_kernel`, specialised for the plan: S programs per group, on-chip or streamed `W_hh` slices,
in-kernel barrier or launch per step) with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32), options={"num_warps": ...})` and reads
the result back:

* registers per thread, spills (`LOCAL` bytes) and stack from `cuobjdump --dump-resource-usage`,
* shared memory bytes (`metadata.shared`) against the target's per-block limit,
* tensor-core instructions in the SASS (`HMMA`, `HGMMA`; `cuobjdump -sass`), how many of them sit inside
  a loop (a backward branch encloses them: the time loop), and the deepest loop nest they are in,
* the `W_hh` path, S, and the number of programs one launch starts (`S * cdiv(B, block_b) * D`) against
  the target's SMs, with the plan's estimated time per forward step (an estimate: kernels/config.py),
* from the PTX: GPU-scope release and acquire operations (the split barrier) and every load of the
  exchange buffer (those located in `kernels/exchange.py`), flagging any that may allocate in L1.

Each target is planned with its own limits (`DeviceLimits.for_arch`): the configuration compiled for
sm_86 is the one an sm_86 device would launch. A case names its cell (`cell="LSTM"` / `"GRU"`, an LSTM's
`proj_size`): the plan is then `select_config(..., cell, proj_size)` and each kernel is specialised as
its launcher does it (`forward.common_kwargs`, `backward.kernel_constants`), so the gated variants are
checked the same way as the Elman ones.

The kernels are specialised the way a real launch specialises them (`JITFunction.run`): pointers and
integer arguments divisible by 16 carry `tt.divisibility=16`, integers equal to 1 become constexprs,
`T` is not specialised; integer values are those of contiguous buffers of the given (H, B, D).

Compiling needs the kernels decorated with the interpreter off, so the work always runs in a process with
`TRITON_INTERPRET=0`: `compile_report()` (callable from an interpreter-mode process such as the test
suite) starts `python -m fused_birnn.compile_report` for it, and the command line re-executes itself
with the interpreter off when it was started with it on. Compiles run in a pool of `--jobs` processes
(2 by default) and use Triton's on-disk cache (`TRITON_CACHE_DIR`).

    python -m fused_birnn.compile_report --hidden 50 128 256 512 --batch 5 64 \
        --dtype float16 bfloat16 float32 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}  # = kernels.config.SHARED_PER_BLOCK
MAX_REGISTERS = 255
DTYPES = ("float16", "bfloat16", "float32")
TL_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
KERNELS = {  # name -> pass (one skeleton per pass serves every W_hh path and split)
    "birnn_fwd_kernel": "forward",
    "birnn_bwd_kernel": "backward",
}
TENSOR_CORE_OPS = ("HMMA", "HGMMA")  # HGMMA: sm_90 warpgroup MMA; HMMA: mma.sync (sm_80+, fp16/bf16/tf32)


@dataclass(frozen=True)
class CompileCase:
    """One (H, B, dtype) to compile; `block_b`.. None: what `select_config(H, B, dtype)` returns.

    Attributes:
        hidden_size, batch_size: the layer's H and B (runtime arguments; they pick the config and the
            divisibility specialisation).
        dtype: "float16", "bfloat16" or "float32".
        input_precision: `tl.dot` precision, "ieee" or "tf32" (fp32 only); None: "ieee".
        relu: the relu cell instead of tanh.
        lengths: the variable-length variant (`HAS_LENGTHS`: per-row lengths, PackedSequence).
        directions: D (grid axis 1).
        block_b, block_h, w_on_chip, num_warps: an explicit `RecurrenceConfig` (all four, or none; `plan`
            gives every field).
        kernels: kernel names to compile; None: the forward and backward kernel of the config's path.
        targets: compute capabilities.
        num_stages: a Triton `num_stages` option to try; None: not passed (the launchers' default).
        split: S programs per group forced into the plan (what `FUSED_BIRNN_SPLIT=S` does); None: the
            plan's choice.
        cell: None (Elman, `relu` picks the activation), "LSTM" or "GRU": the kernels' CELL
            specialisation, planned with `select_config(..., cell, proj_size)`, each kernel specialised
            as its launcher does (`forward.kernel_constants`, `backward.kernel_constants`).
        proj_size: an LSTM's projection P (0: none).
        plan: `RecurrenceConfig` fields (a dict) to compile instead of the planner's choice (e.g. a forced
            partial residency).
    """

    hidden_size: int
    batch_size: int
    dtype: str
    input_precision: str | None = None
    relu: bool = False
    lengths: bool = False
    directions: int = 2
    block_b: int | None = None
    block_h: int | None = None
    w_on_chip: bool | None = None
    num_warps: int | None = None
    kernels: tuple[str, ...] | None = None
    targets: tuple[int, ...] = (80, 86, 89, 90)
    num_stages: int | None = None
    split: int | None = None
    cell: str | None = None
    proj_size: int = 0
    plan: dict | None = None

    @classmethod
    def make(cls, hidden_size: int, batch_size: int, dtype: Any, config: Any = None, **kw) -> "CompileCase":
        """Build from a torch dtype or its name and an optional `RecurrenceConfig`."""
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
        if config is not None:
            kw.update(block_b=config.block_b, block_h=config.block_h, w_on_chip=config.w_on_chip,
                      num_warps=config.num_warps)
            if getattr(config, "num_stages", None) is not None:
                kw.setdefault("num_stages", config.num_stages)
        if "kernels" in kw and kw["kernels"] is not None:
            kw["kernels"] = tuple(kw["kernels"])
        if "targets" in kw:
            kw["targets"] = tuple(kw["targets"])
        return cls(hidden_size, batch_size, name, **kw)


def _as_case(c: Any) -> CompileCase:
    if isinstance(c, CompileCase):
        return c
    if isinstance(c, dict):
        return CompileCase.make(**c)
    return CompileCase.make(*c)


# --------------------------------------------------------------------------------------------------------
# the caller's side: run the report in a subprocess with the interpreter off
# --------------------------------------------------------------------------------------------------------
def compile_report(configs: Iterable[Any], *, jobs: int = 2, timeout: float | None = 1800,
                   env: dict[str, str] | None = None) -> list[dict]:
    """Compile `configs` (CompileCase, dicts of its fields, or `(H, B, dtype[, RecurrenceConfig])`
    tuples) in a `TRITON_INTERPRET=0` subprocess and return one dict per (case, kernel, target).

    Safe to call from a process that runs the interpreter. A failing compile is a row with `error`
    set, not an exception; a crashed subprocess raises RuntimeError with its stderr."""
    cases = [dataclasses.asdict(_as_case(c)) for c in configs]
    run_env = dict(os.environ if env is None else env)
    run_env["TRITON_INTERPRET"] = "0"
    with tempfile.TemporaryDirectory(prefix="fused_birnn_compile_") as tmp:
        cases_path = os.path.join(tmp, "cases.json")
        out_path = os.path.join(tmp, "report.json")
        with open(cases_path, "w") as f:
            json.dump(cases, f)
        cmd = [sys.executable, "-m", "fused_birnn.compile_report", "--cases", cases_path,
               "--json", out_path, "--jobs", str(jobs), "--quiet"]
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        with open(out_path) as f:
            return json.load(f)["rows"]


# --------------------------------------------------------------------------------------------------------
# the compiling side (TRITON_INTERPRET=0)
# --------------------------------------------------------------------------------------------------------
def _resolve(case: CompileCase, arch: int = 90) -> dict:
    """Case -> the config it runs with on target `arch` (plans take the target's limits), and its
    kernels."""
    import torch

    from fused_birnn.kernels.config import DeviceLimits, RecurrenceConfig, select_config

    precision = case.input_precision or "ieee"
    explicit = (case.block_b, case.block_h, case.w_on_chip)
    if case.plan is not None:
        cfg = RecurrenceConfig(**case.plan)
        source = "plan"
    elif all(v is None for v in explicit) and case.num_warps is None:
        # forward the precision if select_config learns to take it (its fp32 choice may depend on TF32)
        params = inspect.signature(select_config).parameters
        kw = {"allow_tf32": precision == "tf32"} if "allow_tf32" in params else (
            {"input_precision": precision} if "input_precision" in params else {})
        if "limits" in params:
            kw["limits"] = DeviceLimits.for_arch(arch)
        if "split" in params:
            kw["split"] = case.split
        if case.cell is not None:
            kw.update(cell=case.cell, proj_size=case.proj_size or None)
        cfg = select_config(case.hidden_size, case.batch_size, getattr(torch, case.dtype), **kw)
        source = "select_config"
    elif any(v is None for v in explicit):
        raise ValueError(f"{case}: give block_b, block_h and w_on_chip together (or none)")
    else:
        cfg = RecurrenceConfig(case.block_b, case.block_h, case.w_on_chip,
                               4 if case.num_warps is None else case.num_warps)
        source = "explicit"
    if precision not in ("ieee", "tf32") or (precision == "tf32" and case.dtype != "float32"):
        raise ValueError(f"{case}: input_precision {precision!r} (tf32 is for float32 only)")
    kernels = case.kernels or tuple(KERNELS)
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r}; expected one of {tuple(KERNELS)}")
    # num_stages: the case's experiment, else the config's if it grows one (the launchers then pass it)
    stages = getattr(cfg, "stages", None)  # what the launchers pass (1 wherever the exchange buffer is read)
    num_stages = case.num_stages if case.num_stages is not None else (
        stages(case.hidden_size) if stages else getattr(cfg, "num_stages", None))
    return dict(config=cfg, config_source=source, input_precision=precision, kernels=kernels,
                num_stages=num_stages)


def _int_args(kernel: str, H: int, B: int, D: int, cfg, cell: str | None = None, proj_size: int = 0,
              params: Sequence[str] = ()) -> dict[str, int]:
    """Integer arguments (other than T and the step range) of a launch on contiguous buffers, as the
    launchers pass them."""
    G = {None: 1, "LSTM": 4, "GRU": 3}[cell]
    P = proj_size or H
    UP = cfg.proj_units_per_program(H, P) if proj_size else cfg.units_per_program(H)
    saved = D * B * (G + 1) * H if cell else 0
    if kernel.startswith("birnn_fwd"):
        names = ("stride_xt", "stride_xb", "stride_ot", "stride_ob", "stride_hnd", "stride_hnb", "P", "UP",
                 "stride_st")
        vals = (B * D * G * H, D * G * H, B * D * P, D * P, B * P, P, P, UP, saved)
    else:  # out/grad_out [T, B, D*P], grad_pre [T, B, D*G*H], grad_h0 [D, B, P]
        names = ("stride_ot", "stride_ob", "stride_got", "stride_gob", "stride_gpt", "stride_gpb",
                 "stride_gh0d", "stride_gh0b", "P", "UP", "stride_st")
        vals = (B * D * P, D * P) * 2 + (B * D * G * H, D * G * H, B * P, P, P, UP, saved)
    return dict(B=B, H=H, U=cfg.units_per_program(H), **dict(zip(names, vals)))


def _specialise(fn, case: CompileCase, precision: str, cfg) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as `JITFunction.run` builds them for this launch."""
    import torch
    import triton.language as tl

    H = case.hidden_size
    ints = _int_args(fn.__name__, H, case.batch_size, case.directions, cfg, case.cell, case.proj_size,
                     [p.name for p in fn.params])
    mode = case.cell or ("RNN_RELU" if case.relu else "RNN_TANH")
    persistent = cfg.runs_persistent(H, 1024)
    constexprs: dict[Any, Any] = dict(HAS_LENGTHS=case.lengths, RELU=case.relu, ACC_DTYPE=tl.float32,
                                      INPUT_PRECISION=precision, BLOCK_B=cfg.block_b, BARRIER=persistent)
    if fn.__name__.startswith("birnn_fwd"):  # the forward's constexprs exactly as its launcher builds them
        from fused_birnn.kernels.forward import kernel_constants

        constexprs.update(kernel_constants(cfg, H, case.proj_size or H, mode, bool(case.proj_size)), PHASE=0)
    else:  # the backward's, as its launcher specialises it
        from fused_birnn.kernels.backward import kernel_constants

        shape = kernel_constants(cfg, H, case.proj_size or H, mode, bool(case.proj_size), persistent)
        constexprs.update({k: v for k, v in shape.items() if k not in ("UP", "PHASES")})
    del torch
    signature: dict[str, str] = {}
    attrs: dict[tuple, list] = {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            # dh and aux (the backward's carries) are fp32, the barrier counters and the error flag int32,
            # lengths int64; every other buffer (the exchange buffers too) has the input dtype
            signature[name] = ("*fp32" if name in ("dh_ptr", "aux_ptr") else "*i64" if name == "lengths_ptr"
                               else "*i32" if name in ("sync_ptr", "err_ptr") else TL_PTR[case.dtype])
            if not p.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif p.do_not_specialize:  # T, the step range, the spin bound
            signature[name] = "i32"
        else:
            v = ints[name]
            if v == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def cuobjdump_path() -> str:
    """The `cuobjdump` the triton wheel ships (it calls the `nvdisasm` next to it for `-sass`)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def analyse_sass(sass: str) -> dict:
    """Tensor-core instruction counts, and where they sit relative to loops (backward branches)."""
    insts: list[tuple[int, str, str]] = []
    for m in _SASS_LINE.finditer(sass):
        insts.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops: list[tuple[int, int]] = []  # [head, back-branch] address ranges
    for addr, op, rest in insts:
        if op.startswith("BRA"):
            t = _BRANCH_TARGET.findall(rest)  # the last address operand (`BRA P3, 0x3300` has a predicate first)
            if t:
                target = int(t[-1], 16)
                if target < addr:  # a self-branch (the trailing trap) is not a loop
                    loops.append((target, addr))
    # out-of-line code (e.g. a divergent shuffle's slow path placed after the loop) branches back into the
    # middle of a loop: its range overlaps that loop's without nesting; real loops nest or are apart
    loops = [(lo, hi) for lo, hi in loops
             if not any(lo2 < lo <= hi2 < hi for lo2, hi2 in loops)]
    local = {"STL": 0, "LDL": 0}
    local_in_loop = 0  # spill traffic inside a loop costs every step
    for addr, op, _ in insts:
        if op.split(".")[0] in local:
            local[op.split(".")[0]] += 1
            local_in_loop += any(lo <= addr <= hi for lo, hi in loops)
    ops: dict[str, int] = {}
    in_loop = 0
    depth = 0
    by_depth: dict[int, int] = {}
    for addr, op, _ in insts:
        if op.split(".")[0] in TENSOR_CORE_OPS:
            ops[op] = ops.get(op, 0) + 1
            d = sum(1 for lo, hi in loops if lo <= addr <= hi)
            in_loop += d > 0
            depth = max(depth, d)
            by_depth[d] = by_depth.get(d, 0) + 1
    return dict(tensor_core=sum(ops.values()), tensor_core_in_loop=in_loop, tensor_core_loop_depth=depth,
                tensor_core_by_depth={str(k): v for k, v in sorted(by_depth.items())},
                tensor_core_ops=ops, loops=len(loops), sass_instructions=len(insts),
                local_stores=local["STL"], local_loads=local["LDL"], local_in_loop=local_in_loop)


_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_PTX_MEM = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|cp\.async)\.[\w.]+)")
_PTX_SEM = re.compile(r"\b(?:atom|red|ld|st)\.[\w.]+")  # memory operations that may carry a semantic


def exchange_load_files() -> set[str]:
    """File names whose code is exchange-buffer loads only (`kernels/exchange.py`)."""
    from fused_birnn.kernels import exchange

    return {os.path.basename(exchange.__file__)}


def weight_load_files() -> set[str]:
    """File names whose global loads are loads of weight slices only (`kernels/product.py`)."""
    from fused_birnn.kernels import product

    return {os.path.basename(product.__file__)}


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")


def ptx_loops(lines: Sequence[str]) -> list[tuple[int, int]]:
    """[first, last] line ranges of the loops in PTX: a branch back to a label above it."""
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        m = _PTX_BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    return loops


def weight_loads(ptx: str, weight_files: set[str]) -> dict:
    """Global loads located (`.loc`) in `weight_files` (the weight slices' loads), and how many of them
    sit inside a loop of the PTX (a resident slice must have none there: it is loaded once, before the
    time loop, and read from shared memory every step)."""
    lines = ptx.splitlines()
    files = {m.group(1): os.path.basename(m.group(2)) for m in map(_PTX_FILE.match, lines) if m}
    loops = ptx_loops(lines)
    where = None
    total = in_loop = 0
    for i, line in enumerate(lines):
        m = _PTX_LOC.match(line)
        if m:
            where = files.get(m.group(1), "")
            continue
        m = _PTX_MEM.match(line)
        if m and where in weight_files and m.group(1).startswith("ld.global"):
            total += 1
            in_loop += any(lo <= i <= hi for lo, hi in loops)
    return dict(weight_loads=total, weight_loads_in_loop=in_loop)


def analyse_ptx(ptx: str, exchange_files: set[str]) -> dict:
    """The barrier's memory-model operations and the exchange loads in the PTX: operations with release
    (or acq_rel) and acquire semantics at GPU scope (`atom`, `red`, and `ld.acquire`, which Triton emits
    for an acquire `atomic_add` of 0), and every global load or `cp.async` whose `.loc` is in one of
    `exchange_files` (the line numbers of an inlined load's `.loc` vary, its file does not), with those
    that may allocate in L1 (`ld.global` without `.cg`/`.cv`/volatile/relaxed/acquire, `.ca`, `.nc`,
    `cp.async.ca`)."""
    lines = ptx.splitlines()
    files = {m.group(1): os.path.basename(m.group(2)) for m in map(_PTX_FILE.match, lines) if m}  # at the end
    where = None
    loads, l1 = [], []
    release = acquire = 0
    for line in lines:
        m = _PTX_LOC.match(line)
        if m:
            where = files.get(m.group(1), "")
            continue
        for op in _PTX_SEM.findall(line):
            parts = op.split(".")
            if "gpu" in parts or "sys" in parts:
                release += "release" in parts or "acq_rel" in parts
                acquire += "acquire" in parts or "acq_rel" in parts
        m = _PTX_MEM.match(line)
        if m and where in exchange_files:
            op = m.group(1)
            parts = op.split(".")
            if (parts[0] == "ld" and "shared" in parts) or (parts[0] == "cp" and parts[2] not in ("ca", "cg")):
                continue  # shared-memory reads; cp.async.commit_group / wait_group
            loads.append(op)
            bypass = (parts[0] == "ld" and bool({"volatile", "relaxed", "acquire", "cg", "cv"} & set(parts))
                      or op.startswith("cp.async.cg"))
            if not bypass or "nc" in parts or "ca" in parts:
                l1.append(op)
    return dict(release_ops=release, acquire_ops=acquire, exchange_loads=len(loads),
                exchange_load_ops=sorted(set(loads)), exchange_loads_l1=sorted(set(l1)))


def _compile_one(job: dict) -> dict:
    """Worker: compile one kernel for one target; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_birnn.kernels import backward, forward

    row = dict(job["row"])
    t0 = time.perf_counter()
    try:
        fn = getattr(forward if row["kernel"].startswith("birnn_fwd") else backward, row["kernel"])
        if not hasattr(fn, "params"):
            raise RuntimeError(f"{row['kernel']} is {type(fn).__name__}, not a JITFunction: "
                               "the kernels were decorated with TRITON_INTERPRET on")
        case = CompileCase(**job["case"])
        cfg = job["config"]
        signature, constexprs, attrs = _specialise(fn, case, row["input_precision"], cfg)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": row["num_warps"]}
        if getattr(cfg, "max_registers", None) is not None:
            options["maxnreg"] = cfg.max_registers
        if row["num_stages"] is not None:
            options["num_stages"] = row["num_stages"]
        k = triton.compile(src, target=GPUTarget("cuda", row["arch"], 32), options=options)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        cuobjdump = cuobjdump_path()
        with tempfile.TemporaryDirectory(prefix="fused_birnn_cubin_") as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        m = _RESOURCE.search(usage)
        if m is None:
            raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage}")
        regs, stack, _static_shared, local = map(int, m.groups())
        shared = int(k.metadata.shared)
        sass_info = analyse_sass(sass)
        sass_info.update(analyse_ptx(k.asm["ptx"], exchange_load_files()))
        sass_info.update(weight_loads(k.asm["ptx"], weight_load_files()))
        sass_info["mma_per_step"] = sass_info["tensor_core_by_depth"].get("1", 0) * int(k.metadata.num_warps)
        # ptxas places register spills in the stack frame: cuobjdump's STACK (LOCAL stays 0 for them)
        row.update(registers=regs, local_bytes=local, stack_bytes=stack, spill_bytes=local + stack,
                   shared=shared,
                   fits_shared=shared <= row["shared_limit"], num_warps_compiled=int(k.metadata.num_warps),
                   **sass_info, error=None)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row, not a crash
        row.update(error=f"{type(e).__name__}: {e}", compile_s=round(time.perf_counter() - t0, 2))
    row["problems"] = problems(row)
    return row


# Stack outside every loop is accepted, and reported (the table's `spill` column): it costs a few stores
# and loads once per launch, none per step. Where the compile checks have seen it: ptxas issuing a pass's
# resident chunk loads ahead of their stores to shared memory (the prologue before the time loop), and
# 8-24 B at 8 warps where ptxas stops at 128 registers (shared/research/large-h-design.md section 1).
SPILL_OUTSIDE_LOOPS = "outside the time loop: once per launch (the resident slice's prologue), never per step"


def problems(row: dict) -> list[str]:
    """What stops this compile from being used on its target: empty when it is fine.

    * shared memory over the target's per-block limit;
    * a register spill inside a loop (every step pays it); outside the loops it is reported, not a problem
      (`SPILL_OUTSIDE_LOOPS`);
    * a load of the weights' slices inside the time loop of a fully resident plan (it must read them from
      shared memory only), or none in a plan that streams some;
    * the gate product's MMAs repeated across warps, or tensor-core instructions per step other than the
      useful work with the repeats `kernels.config.mma_replication` predicts for the other products (a
      narrow projection), counted from the SASS: the time loop's MMAs times the warps (fully resident
      plans exactly; where chunks stream, in their own loop, no more than that);
    * the split barrier's GPU-scope release/acquire missing, an exchange load that may hit L1;
    * 16-bit or TF32 dots without tensor cores, or with none in the time loop."""
    if row.get("error"):
        return [f"compile failed: {row['error'].splitlines()[0]}"]
    out = []
    if not row["fits_shared"]:
        out.append(f"shared {row['shared']} B > {row['shared_limit']} B limit of {row['target']}")
    if row["local_in_loop"]:  # spilled values reloaded every step (outside the loops: once a launch, allowed)
        out.append(f"spills inside a loop: STACK {row['stack_bytes']} B, LOCAL {row['local_bytes']} B, "
                   f"{row['local_stores']} STL / {row['local_loads']} LDL in the SASS, {row['local_in_loop']} "
                   f"of them inside a loop")
    if row.get("w_hh_path") == "resident" and row.get("weight_loads_in_loop"):
        out.append(f"{row['weight_loads_in_loop']} loads of the resident weights inside a loop")
    if row.get("w_hh_path") in ("partial", "streamed") and not row.get("weight_loads_in_loop"):
        out.append("a plan that streams weight chunks with no weight load inside a loop")
    if row.get("mma_useful"):
        executed, expected = row.get("mma_per_step", 0), row["mma_expected"]
        if row["mma_replication"][0] > 1:
            out.append(f"the gate product repeats its MMAs on {row['mma_replication'][0]} warps")
        least = row.get("mma_least", expected)
        if executed > expected or (row.get("w_hh_path") == "resident" and executed < least):
            out.append(f"{executed} tensor-core MMAs per step against {expected} expected ({row['mma_useful']} "
                       f"useful, repeats {row['mma_replication']}): the layout is not the one modelled")
    if row.get("exchange_loads_l1"):
        out.append(f"exchange-buffer loads that may hit a stale L1 line: {row['exchange_loads_l1']}")
    if row.get("split", 1) > 1 and row.get("persistent"):
        if not row.get("release_ops") or not row.get("acquire_ops"):
            out.append(f"split barrier without GPU-scope release ({row.get('release_ops')}) and acquire "
                       f"({row.get('acquire_ops')}) atomics")
        if not row.get("exchange_loads"):
            out.append("split kernel with no exchange-buffer load found in the PTX")
    wants_tc = row["dtype"] in ("float16", "bfloat16") or row["input_precision"] == "tf32"
    if wants_tc and row["tensor_core"] == 0:
        out.append("no tensor-core instructions")
    elif wants_tc and row["tensor_core_in_loop"] == 0:
        out.append("tensor-core instructions only outside the time loop")
    return out


def plan_shape(kernel: str, cfg, case: CompileCase, precision: str = "ieee") -> dict:
    """What a kernel of plan `cfg` holds and multiplies per step and program (`kernels.config.pass_shape`):
    its slice's chunks (`chunks`, of which `resident_chunks` stay on chip), the W path ("resident",
    "partial" or "streamed"), the K chunk, the backward's exchange, the warps splitting each product's K
    (`split_k`), and the tensor-core MMAs one step needs (`mma_useful`; `mma_expected` with the repeats
    the layout model predicts, `mma_replication` per product, the gate product's first; `mma_least` without
    the GRU's padding block, which the compiler may drop): m16n8k16 for 16-bit inputs, m16n8k8 for TF32
    (0 for exact fp32: FMA dots)."""
    from fused_birnn.kernels import config as C

    H, P = case.hidden_size, case.proj_size or case.hidden_size
    forward = kernel.startswith("birnn_fwd")
    G = C.gate_count(case.cell)
    shape = C.pass_shape(cfg, H, P, G, bool(case.proj_size), forward, cfg.runs_persistent(H, 1024))
    kstep = 16 if case.dtype in ("float16", "bfloat16") else 8 if precision == "tf32" else 0
    reps = C.mma_replication(shape["products"], cfg.warps(forward))
    mma = [0 if not kstep else (m // 16) * (n // 8) * (k // kstep) for m, n, k, _, _ in shape["products"]]
    chunks = shape["chunks"] + shape["chunks2"]
    resident = shape["resident"] + shape["resident2"]
    expected = sum(u * r for u, r in zip(mma, reps))
    # the GRU forward's gate product is padded to four gate blocks; the fourth's results are never read, so
    # the compiler may drop its MMAs where the layout gives them n-tiles of their own (sm_80, TF32, H=50)
    dead = mma[0] // 4 * reps[0] if forward and G == 3 else 0
    return dict(chunks=chunks, resident_chunks=resident, block_k=shape["block_k"], exchange=shape["exchange"],
                w_hh_path="resident" if resident == chunks else "streamed" if resident == 0 else "partial",
                split_k=[p[4] for p in shape["products"]], mma_replication=reps, mma_useful=sum(mma),
                mma_expected=expected, mma_least=expected - dead)


def _plan(cases: Sequence[CompileCase]) -> list[dict]:
    """One job per (case, kernel, target)."""
    import torch

    from fused_birnn.kernels.config import DeviceLimits, estimate_step_us

    jobs = []
    for case in cases:
        for arch in case.targets:
            if arch not in SHARED_LIMIT:
                raise ValueError(f"target sm_{arch}: no shared memory limit known ({sorted(SHARED_LIMIT)})")
            r = _resolve(case, arch)
            cfg = r["config"]
            H = case.hidden_size
            progs = cfg.programs(H, case.batch_size, case.directions)
            for kernel in r["kernels"]:
                forward = kernel.startswith("birnn_fwd")
                est = estimate_step_us(cfg, H, case.batch_size, getattr(torch, case.dtype),
                                       r["input_precision"] == "tf32", DeviceLimits.for_arch(arch), case.directions,
                                       {None: 1, "LSTM": 4, "GRU": 3}[case.cell], case.proj_size, forward=forward)
                row = dict(kernel=kernel, target=f"sm_{arch}", arch=arch, hidden_size=case.hidden_size,
                           batch_size=case.batch_size, dtype=case.dtype, input_precision=r["input_precision"],
                           relu=case.relu, lengths=case.lengths, directions=case.directions,
                           cell=case.cell or ("RNN_RELU" if case.relu else "RNN_TANH"), proj_size=case.proj_size,
                           config_source=r["config_source"],
                           block_b=cfg.block_b, block_h=cfg.block_h,
                           num_warps=cfg.warps(forward=forward), programs=progs,
                           split=cfg.programs_per_group(H), units=cfg.units_per_program(H), forced_split=case.split,
                           persistent=cfg.runs_persistent(H, 1024),
                           sms=DeviceLimits.for_arch(arch).sm_count, estimate_us_per_step=est["us"],
                           estimate=est,
                           num_stages=r["num_stages"], max_registers=getattr(cfg, "max_registers", None),
                           shared_limit=SHARED_LIMIT[arch],
                           **plan_shape(kernel, cfg, case, r["input_precision"]))
                jobs.append(dict(row=row, case=dataclasses.asdict(case), config=cfg))
    return jobs


def run_jobs(jobs: list[dict], workers: int = 2) -> list[dict]:
    """Compile in a process pool (fork: the workers inherit the non-interpreted kernels)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1 or len(jobs) <= 1:
        return [_compile_one(j) for j in jobs]
    # longest first, so that a big compile does not start last
    order = sorted(range(len(jobs)), key=lambda i: -(jobs[i]["row"]["block_h"] ** 2 * jobs[i]["row"]["block_b"]))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        futures = {i: pool.submit(_compile_one, jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "target", "dtype", "H", "B", "path", "res", "S", "BBxBNxBK/w", "progs/SMs", "est us/step",
            "regs", "spill", "shared KiB", "fits", "TC (in loop, depth)", "rel/acq", "s")
    lines = []
    for r in rows:
        dt = r["dtype"] + ("/tf32" if r["input_precision"] == "tf32" else "")
        cfg = f"{r['block_b']}x{r['block_h']}x{r.get('block_k', r['block_h'])}/{r['num_warps']}" + (
            f"/s{r['num_stages']}" if r.get("num_stages") is not None else "")
        split = r.get("split", 1)
        mode = "" if split == 1 else (" persist" if r.get("persistent") else " per-step")
        est = r.get("estimate_us_per_step")
        cell = {"LSTM": " lstm", "GRU": " gru"}.get(r.get("cell"), "") + (f"-p{r['proj_size']}" if r.get("proj_size") else "")
        path = r["w_hh_path"] + (f" {r['exchange']}" if r.get("exchange") else "")
        base = [r["kernel"].removeprefix("birnn_").removesuffix("_kernel") + cell, r["target"], dt,
                str(r["hidden_size"]), str(r["batch_size"]), path,
                f"{r.get('resident_chunks', '?')}/{r.get('chunks', '?')}", f"{split}{mode}", cfg,
                f"{r['programs']}/{r.get('sms', '?')}", "-" if est is None else f"~{est:.2f}"]
        if r.get("error"):
            lines.append(base + ["ERROR: " + r["error"].splitlines()[0][:80]])
            continue
        tc_ops = ",".join(sorted({op.split(".")[0] for op in r["tensor_core_ops"]})) or "-"
        regs = f"{r['registers']}" + ("!" if r["registers"] >= MAX_REGISTERS else "")
        lines.append(base + [
            regs, str(r["spill_bytes"]), f"{r['shared'] / 1024:.1f}",
            "yes" if r["fits_shared"] else f"NO (> {r['shared_limit'] / 1024:.0f})",
            f"{r['tensor_core']} {tc_ops} ({r['tensor_core_in_loop']}, {r['tensor_core_loop_depth']})",
            f"{r.get('release_ops', 0)}/{r.get('acquire_ops', 0)}", f"{r['compile_s']:.1f}"])
    widths = [max(len(x[i]) for x in [head, *lines] if i < len(x)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < len(widths) else c  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths + [0] * len(cells))))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines]
    bad = [r for r in rows if r["problems"]]
    out.append(f"\n{len(rows)} compiles, {len(bad)} with problems"
               + ("" if not bad else ":\n" + "\n".join(
                   f"  {r['kernel']} {r['target']} {r['dtype']}/{r['input_precision']} H={r['hidden_size']} "
                   f"B={r['batch_size']}: {'; '.join(r['problems'])}" for r in bad)))
    out.append("regs with '!' are at the 255-register cap; spill = stack bytes (outside the loops unless a problem "
               "says otherwise); path = the weights' (resident, partial, streamed) and the backward's exchange; res "
               "= resident / all chunks; TC = tensor-core instructions in the SASS; S = programs per group "
               "(persist: in-kernel barrier, per-step: a launch per step); rel/acq = GPU-scope release/acquire "
               "atomics in the PTX.\n'est us/step' is an ESTIMATE of one step of that kernel's pass on the target "
               "(the cost model of kernels/config.py with a typical SM count), not a measurement.")
    return "\n".join(out)


# The surveyed workloads' layers and what the issue asked of an H100 SXM per forward step, fp16 (us; an
# estimate for an estimate: no GPU has run these kernels)
WORKLOADS = (  # (name, cell, H, B, proj_size, target us)
    ("seed", None, 50, 15, 0, None), ("tagger", None, 256, 32, 0, None), ("pyannote", "LSTM", 128, 32, 0, None),
    ("Open-Unmix", "LSTM", 256, 16, 0, None), ("Tacotron 2", "LSTM", 256, 64, 0, 2.0),
    ("ESPnet", "LSTM", 320, 30, 0, 2.5), ("deepspeech", "LSTM", 1024, 32, 0, 3.5),
    ("DeepSpeech2", "GRU", 1024, 32, 0, 3.5), ("NeMo", "LSTM", 2048, 16, 320, 6.5),
    ("DeepBench", None, 1760, 32, 0, 4.0), ("DeepBench", None, 2560, 32, 0, 7.0),
)
DEVICES = (("H100 SXM", 90, 132), ("A100", 80, 108), ("L40", 89, 142))


def estimates_table(dtype: str = "float16") -> str:
    """A markdown table of the plan and the cost model's ESTIMATED forward and backward step (us) of every
    surveyed workload on an H100 SXM, an A100 and an L40 (`kernels.config`; no compile, no GPU)."""
    import torch

    from fused_birnn.kernels import config as C

    dt = getattr(torch, dtype)
    head = ["workload", "cell H B (P)", "target fwd (H100)"]
    for name, _, _ in DEVICES:
        head += [f"{name}: plan", f"{name}: fwd / bwd est. us"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cell, H, B, P, target in WORKLOADS:
        cells = [name, f"{cell or 'RNN'} {H} {B}" + (f" ({P})" if P else ""), "-" if target is None else f"{target}"]
        for _, arch, sms in DEVICES:
            limits = C.DeviceLimits.for_arch(arch, sms)
            cfg = C.select_config(H, B, dt, False, limits, None, cell, P or None)
            G = C.gate_count(cell)
            est = [C.estimate_step_us(cfg, H, B, dt, False, limits, 2, G, P, forward=f) for f in (True, False)]
            S = cfg.programs_per_group(H)
            plan = (f"S={S} {cfg.block_b}x{cfg.block_h}, {est[0]['resident_chunks']}/{est[0]['chunks']} res."
                    + (f", {est[1]['exchange']}" if S > 1 else "") + ("" if est[0]["persistent"] else ", per step"))
            cells += [plan, f"{est[0]['us']:.2f} / {est[1]['us']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interpreter_on() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _interpreter_on():  # decorated kernels would be InterpretedFunctions: run again with it off
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.run([sys.executable, "-m", "fused_birnn.compile_report", *argv], env=env).returncode

    ap = argparse.ArgumentParser(prog="python -m fused_birnn.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[50, 128, 256, 512])
    ap.add_argument("--batch", type=int, nargs="+", default=[5, 64])
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    ap.add_argument("--fp32-precision", nargs="+", choices=("ieee", "tf32"), default=["ieee"],
                    help="input precision(s) of the float32 cases (default ieee)")
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 86, 89, 90], help="compute capabilities")
    ap.add_argument("--relu", action="store_true", help="the relu cell (default tanh)")
    ap.add_argument("--lengths", action="store_true", help="the variable-length (PackedSequence) variant")
    ap.add_argument("--cell", choices=("LSTM", "GRU"), help="a gated cell's forward (default: Elman, both passes)")
    ap.add_argument("--proj-size", type=int, default=0, help="LSTM projection size (default none)")
    ap.add_argument("--directions", type=int, default=2)
    ap.add_argument("--cases", help="JSON list of CompileCase fields (replaces --hidden/--batch/--dtype)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--check", action="store_true", help="exit 1 when any compile has a problem")
    ap.add_argument("--quiet", action="store_true", help="no table")
    ap.add_argument("--estimates", action="store_true",
                    help="print the surveyed workloads' plans and ESTIMATED step times on an H100, A100, L40; no compile")
    args = ap.parse_args(argv)

    if args.estimates:
        for dt in args.dtype:
            print(f"{dt}: ESTIMATES from the cost model of kernels/config.py, not measurements\n")
            print(estimates_table(dt) + "\n")
        return 0
    if args.cases:
        with open(args.cases) as f:
            cases = [_as_case(c) for c in json.load(f)]
    else:
        cases = [CompileCase.make(h, b, dt, input_precision=p, relu=args.relu, lengths=args.lengths,
                                   directions=args.directions, cell=args.cell, proj_size=args.proj_size,
                                  targets=args.targets)
                 for dt in args.dtype for h in args.hidden for b in args.batch
                 for p in (args.fp32_precision if dt == "float32" else ["ieee"])]

    from fused_birnn.kernels import backward, forward  # decorate now, before the workers fork

    for fn in (forward.birnn_fwd_kernel, backward.birnn_bwd_kernel):
        assert hasattr(fn, "params"), "kernels decorated with the interpreter on"

    t0 = time.perf_counter()
    rows = run_jobs(_plan(cases), args.jobs)
    wall = time.perf_counter() - t0
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, wall_s=round(wall, 1), rows=rows), f, indent=1)
    if not args.quiet:
        print(format_table(rows))
        print(f"wall {wall:.1f} s with {args.jobs} jobs")
    return 1 if args.check and any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
