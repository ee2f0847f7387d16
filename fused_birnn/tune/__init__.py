"""`backend='auto'`: which implementation runs a call, measured on the device and checked against nn's kernel.

What is decided. A call of `fused_birnn.RNN` / `LSTM` / `GRU` with `backend='auto'` runs either nn's own
kernel for the cell ("aten": `torch._VF.rnn_tanh` / `lstm` / `gru`, what nn's class calls: cuDNN on CUDA,
ATen's CPU kernels on a CPU) for the whole stack, or our layers, one `functional.birnn_layer` per layer:
on CUDA the Triton kernels with the planner's plan ("triton") or another split worth trying
("triton:split=S"), elsewhere our PyTorch path ("torch"). The decision is per module call shape
(`Key`): the cell, input, hidden and projection sizes, layers, directions, bias, the device (GPU name),
dtype and autocast dtype, TF32, whether a backward follows, how rows end (all at T, a PackedSequence, or
`lengths=` on a padded batch), a batch bucket (the next power of two), a length bucket (the power of two
at or below T, 64 and above alike) and, on a CPU, the thread count. Why per module call and not per
layer: nn's kernel runs the whole stack in one call (cuDNN overlaps layers), which is exactly what "never
slower than nn's class" compares against; our layers of one module share one plan (the plan depends on H,
B and the dtype, which all layers share).
The length bucket is not in the issue's list of key fields: on a CPU the measured crossover is in T (our
hand-written BPTT gains per step, our per-layer Python costs per call), and a probe is at most 64 steps.

How. The first call of a key (`choose`) builds a probe of that shape (`ModuleProbe`: the bucket's B, T =
the bucket's lower bound, at most `PROBE_MAX_STEPS`; random inputs from a private generator, the
module's own weights detached, no dropout: the user's random streams and gradients are untouched), runs
every candidate once (warm-up; compiles a plan's kernels), compares each of ours with nn's kernel on it
(the parity guard: outputs and, for training, the gradients of the input, the states and every weight,
by the bench's parity criterion, `fused_birnn.bench.parity`), then times the candidates that agree,
interleaved round by round (`measure_ms`: CUDA events on a GPU, wall clock on a CPU; at least
`MIN_ROUNDS` rounds and `BUDGET_S` seconds), forward only for inference, forward and backward for
training. The fastest (by median) runs from then on, except that the unmeasured default
(`default_choice`: the planner's kernels on CUDA, the fixed rule of earlier versions on a CPU) is kept
unless the fastest beats it by more than `MARGIN` in three rounds of four (`clearly_faster`). A candidate
of ours that disagrees with nn's kernel, or raises, is never chosen for that key, and a warning names the
shape, the plan and the error, once.

Capabilities (`aten_refusal`, per call, since they depend on the call and not only on its shape): on
CUDA nn's kernel (cuDNN) is not chosen for T > 65,535 (it fails), for a backward in eval() mode, under
`torch.use_deterministic_algorithms(True)` (cuDNN's RNN is not deterministic), or with `lengths=` while
a CUDA graph is captured (packing reads lengths on the host); the next candidate of the ranking serves,
and our PyTorch path where none is left. ATen's CPU kernels have none of these limits. Not known at
forward time, so not covered: double backward (`create_graph=True`) through a call cuDNN served raises
torch's own error, as with nn's class; pin `backend='triton'` for it. Pinning (`backend='triton'` or
`'torch'`) bypasses all of this; it is how a user gets our determinism guarantee on CUDA.

Kept. Decisions live in memory per process and on disk, one JSON file per device kind and environment
(`cache_file`: under `$FUSED_BIRNN_TUNE_CACHE`, else `$XDG_CACHE_HOME/fused_birnn`, else
`~/.cache/fused_birnn`; `FUSED_BIRNN_TUNE_CACHE=0` keeps them in memory only), named by a hash of
GPU driver, CUDA, cuDNN, torch, triton and package versions (a CPU's file: its model and the versions), so
that a second process starts with the same choices. The file is read once per process at the first
unseen key; a corrupt or foreign file is ignored with a warning; writes are atomic (a temporary file,
then `os.replace`). Nothing is measured while a CUDA graph is captured, while torch.jit traces, or with
`FUSED_BIRNN_AUTOTUNE=0` (then the default runs, as before this module existed); under torch.compile the
module does not consult this at all (its traced graph holds our custom ops, with the planner's plan).
On a CPU with `TRITON_INTERPRET=1` 'auto' runs the interpreter's kernels, as asked, and nothing is
measured.

What it costs: per key, one run of each candidate plus `BUDGET_S` of timing (about 0.3 s on a CPU, 0.5 s
on a GPU, more where one call takes longer than that: at least `MIN_ROUNDS` rounds) and, on a GPU, the
first compile of each alternative plan's kernels (seconds; Triton caches them on disk). `decisions()` and
`python -m fused_birnn.tune --show` list the decisions with the measured times, the ratios against nn's
kernel and, for our kernel plans, the cost model's estimate beside each measured time (an estimate).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

AUTOTUNE_ENV = "FUSED_BIRNN_AUTOTUNE"  # "0": measure nothing, the default choice runs
CACHE_ENV = "FUSED_BIRNN_TUNE_CACHE"  # a folder for the decision files; "0": memory only
OFF = ("0", "off", "false", "no")
SCHEMA = 1  # the decision file's layout; a file of another schema is ignored
PROBE_MAX_STEPS = 64  # a probe runs at most this many steps (and keys do not tell longer sequences apart)
MARGIN = 0.03  # the default choice stays unless another candidate is this much faster in 3 rounds of 4
MAX_ALTERNATIVES = 2  # kernel plans tried besides the planner's (the estimated fastest other splits)
BUDGET_S = {"cuda": 0.5, "cpu": 0.3}  # seconds of timing per key, after the warm-up runs
MIN_ROUNDS, MAX_ROUNDS = 8, 200  # timing rounds per key (each runs every candidate once)
CUDNN_MAX_STEPS = 65535  # cuDNN's RNN fails at T >= 65,536
# backend='auto' on a CPU when nothing is measured: Elman training from this many steps runs our path (its
# hand-written BPTT), everything else ATen's kernel; the crossover measured once against nn.RNN (bench/)
ATEN_MAX_TRAINING_STEPS = 32
REFERENCE = "aten"  # nn's own kernel: the reference every other candidate is checked against


class Key(NamedTuple):
    """What a decision depends on (the module docstring): one call shape."""

    cell: str  # nn.RNNBase's mode: RNN_TANH, RNN_RELU, LSTM, GRU
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    directions: int
    bias: bool
    device: str  # "cpu", or the GPU's name
    dtype: torch.dtype
    autocast: torch.dtype | None  # the autocast dtype on CUDA, else None
    tf32: bool  # torch.backends.cudnn.allow_tf32 (CUDA fp32), else False
    grad: bool  # a backward follows (training)
    rows: str  # how rows end: "" all at T, "packed" a PackedSequence, "lengths" lengths= on a padded batch
    batch: int  # bucket: the next power of two >= B
    steps: int  # bucket: the power of two <= T, at most PROBE_MAX_STEPS
    threads: int  # torch.get_num_threads() on a CPU, else 0

    def describe(self) -> str:
        cell = {"RNN_TANH": "RNN", "RNN_RELU": "RNN relu"}.get(self.cell, self.cell)
        size = f"L{self.num_layers} I{self.input_size} H{self.hidden_size}" + (
            f" P{self.proj_size}" if self.proj_size else "")
        dtype = _dtype_name(self.dtype) + (f" autocast {_dtype_name(self.autocast)}" if self.autocast else "") + (
            " tf32" if self.tf32 else "")
        b, t = self.batch, self.steps
        rows = (f"B{b // 2 + 1}-{b}" if b > 2 else f"B{b}") + (
            f" T>={t}" if t == PROBE_MAX_STEPS else f" T{t}-{2 * t - 1}" if t > 1 else " T1")
        where = f"{self.device}" + (f" {self.threads} threads" if self.threads else "")
        return (f"{cell} {size} {'bi' if self.directions == 2 else 'uni'}{'' if self.bias else ' no bias'} "
                f"{rows}{' ' + self.rows if self.rows else ''} {dtype} {'train' if self.grad else 'infer'} ({where})")


@dataclass
class Decision:
    """The outcome for one key.

    Attributes:
        key: the call shape.
        ranking: the candidates that ran and agreed with nn's kernel, the chosen one first, then by time.
        times_ms: each timed candidate's median time on the probe (ms; a GPU's CUDA events or a CPU's clock).
        estimates_ms: for our kernel plans, the cost model's estimate for the probe's recurrence steps (an
            estimate, not a measurement; kernels/config.py).
        rejected: candidates never chosen for this key, and why (raised; disagreed with nn's kernel).
        probe: the probe's `steps` and `batch`.
        default: what runs without measuring (`default_choice`).
        cost_s: seconds the decision took (warm-up, guard, timing).
        source: "measured" (by this process) or "disk" (read from the decision file).
        when: UTC time of the measurement.
    """

    key: Key
    ranking: list[str]
    times_ms: dict[str, float]
    estimates_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    default: str = ""
    cost_s: float = 0.0
    source: str = "measured"
    when: str = ""

    @property
    def choice(self) -> str:
        """What runs where every candidate can serve the call (the first of `ranking`)."""
        return self.ranking[0] if self.ranking else "torch"

    def to_json(self) -> dict:
        d = asdict(self)
        d["key"] = {**self.key._asdict(), "dtype": _dtype_name(self.key.dtype),
                    "autocast": self.key.autocast and _dtype_name(self.key.autocast)}
        del d["source"]
        return d

    @staticmethod
    def from_json(d: dict) -> "Decision":
        k = dict(d["key"])
        if set(k) != set(Key._fields):
            raise ValueError(f"a key with fields {sorted(k)}")
        k["dtype"] = _dtype(k["dtype"])
        k["autocast"] = None if k["autocast"] is None else _dtype(k["autocast"])
        key = Key(**k)
        ranking = [str(n) for n in d["ranking"]]
        times = {str(n): float(v) for n, v in d["times_ms"].items()}
        if not ranking or any(n not in times for n in ranking):
            raise ValueError("a ranking of untimed candidates")
        return Decision(key, ranking, times, {str(n): float(v) for n, v in d.get("estimates_ms", {}).items()},
                        {str(n): str(v) for n, v in d.get("rejected", {}).items()}, dict(d.get("probe", {})),
                        str(d.get("default", "")), float(d.get("cost_s", 0.0)), "disk", str(d.get("when", "")))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r}")
    return dtype


# ------------------------------------------------------------------------------------------ state
_DECISIONS: dict[Key, Decision] = {}
_GENERATION = [0]  # advances at `clear()`: the modules' memos of their calls' decisions start afresh
MEMO_MAX = 4096  # calls a module remembers (distinct B and T), then it starts afresh
_LOADED: set[str] = set()  # device kinds whose decision file this process has read
_WARNED: set[str] = set()
_LOCK = threading.RLock()


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear(memory: bool = True) -> None:
    """Forget this process's decisions (the decision files stay; they are read again at the next unseen
    key) and which warnings were given."""
    with _LOCK:
        _GENERATION[0] += 1
        if memory:
            _DECISIONS.clear()
        _LOADED.clear()
        _WARNED.clear()


def measuring() -> bool:
    """Whether unseen keys are measured (`FUSED_BIRNN_AUTOTUNE`, read at each unseen key; default on)."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in OFF


def paused(device: torch.device) -> bool:
    """Whether nothing may be timed now: torch.compile or torch.jit traces, or a CUDA graph is being captured
    on `device`'s current stream (then a known key's decision, or the default, runs)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


# ------------------------------------------------------------------------------------------ the choice
def _bucket_batch(batch: int) -> int:
    return 1 << (batch - 1).bit_length() if batch > 0 else 0


def _bucket_steps(steps: int) -> int:
    return min(1 << (steps.bit_length() - 1), PROBE_MAX_STEPS) if steps > 0 else 0


@lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def key_of(module, x: Tensor, steps: int, batch: int, rows: str, needs_grad: bool) -> Key:
    """The key of a call of `module` on input `x` (time-major or packed data) of `steps` x `batch` rows
    ending as `rows` says ("", "packed", "lengths")."""
    device = x.device
    if device.type == "cpu":
        where, autocast, tf32, threads = "cpu", None, False, torch.get_num_threads()
    else:
        where = _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        tf32 = bool(torch.backends.cudnn.allow_tf32) and (autocast or x.dtype) == torch.float32
        threads = 0
    return Key(module.mode, module.input_size, module.hidden_size, module.proj_size, module.num_layers,
               2 if module.bidirectional else 1, bool(module.bias), where, x.dtype, autocast, tf32, needs_grad,
               rows, _bucket_batch(batch), _bucket_steps(steps), threads)


def decision_for(module, x: Tensor, steps: int, batch: int, rows: str, needs_grad: bool) -> Decision | None:
    """The decision this process holds (measured, or read from the decision file) for a call of `module` on
    an input like `x` (its dtype and device) of `steps` x `batch` rows ending as `rows` says; None where
    there is none."""
    return _DECISIONS.get(key_of(module, x, steps, batch, rows, needs_grad))


def choose(module, x: Tensor, steps: int, batch: int, rows: str, needs_grad: bool, weights: list[Tensor]) -> str:
    """What runs this `backend='auto'` call of `module` (`FusedRNNBase._choice`, which has ruled out what
    only our layers can serve): "aten" (nn's kernel, whole stack) or a backend of our layers. `x`: the input
    (time-major, or a PackedSequence's data), `steps` x `batch` its T and B, `rows` how rows end ("": all
    at T, "packed": a PackedSequence, "lengths": `lengths=`), `needs_grad` whether a backward follows,
    `weights` the module's weights for this call. Measures the key on first sight (the module docstring);
    a known key costs a dict lookup."""
    if torch.jit.is_tracing():  # sizes are traced tensors there (nothing is measured while tracing)
        steps, batch = int(steps), int(batch)
    cpu = x.is_cpu
    # the module's memo of its calls' decisions: a small tuple per call instead of the whole key (2 us a call)
    call = ((x.dtype, needs_grad, rows, batch, steps, torch.get_num_threads()) if cpu else
            (x.device, x.dtype, needs_grad, rows, batch, steps, torch.is_autocast_enabled("cuda")
             and torch.get_autocast_dtype("cuda"), torch.backends.cudnn.allow_tf32))
    memo = module.__dict__.get("_tune_memo")
    if memo is None or memo[0] != _GENERATION[0] or len(memo[1]) > MEMO_MAX:
        memo = module.__dict__["_tune_memo"] = (_GENERATION[0], {})
    decision = memo[1].get(call)
    if decision is None:
        key = key_of(module, x, steps, batch, rows, needs_grad)
        decision = _DECISIONS.get(key)
        if decision is None:
            decision = _unseen(key, module, x, steps, weights)
            if isinstance(decision, str):
                return decision
        memo[1][call] = decision
    if cpu:  # ATen's CPU kernels serve every call
        return decision.choice
    return pick(decision, call_refusal(x.device.type, module.training, steps, needs_grad, rows == "lengths"))


def call_refusal(device_type: str, training: bool, steps: int, needs_grad: bool, lengths: bool) -> str | None:
    """`aten_refusal` for a call in this process's current state (deterministic algorithms, capture)."""
    if device_type != "cuda":
        return None
    return aten_refusal(device_type, training=training, steps=steps, needs_grad=needs_grad, lengths=lengths,
                        deterministic=torch.are_deterministic_algorithms_enabled(),
                        capturing=torch.cuda.is_current_stream_capturing())


def aten_refusal(device_type: str, *, training: bool, steps: int, needs_grad: bool, lengths: bool,
                 deterministic: bool, capturing: bool) -> str | None:
    """Why nn's kernel cannot serve a call described so (None: it can). CUDA (cuDNN): T > 65,535, a
    backward in eval() mode, deterministic algorithms asked for, `lengths=` while a CUDA graph is captured.
    A CPU (ATen): never (deterministic, backward in eval(), any T, differentiable to any order)."""
    if device_type != "cuda":
        return None
    if steps > CUDNN_MAX_STEPS:
        return f"cuDNN fails at T >= {CUDNN_MAX_STEPS + 1:,} (T = {steps:,})"
    if needs_grad and not training:
        return "cuDNN has no backward in eval() mode"
    if deterministic:
        return "cuDNN's RNN is not deterministic (torch.use_deterministic_algorithms(True) is set)"
    if capturing and lengths:
        return "packing needs the lengths on the host, not while a CUDA graph is captured"
    return None


def pick(decision: Decision, refusal: str | None) -> str:
    """The first candidate of `decision`'s ranking that can serve a call on which nn's kernel has
    `refusal` (None: it can serve); our PyTorch path where none is left (it serves every call)."""
    for name in decision.ranking:
        if name != REFERENCE or refusal is None:
            return name
    return "torch"


def default_choice(key: Key, steps: int) -> str:
    """What runs a key that is not measured (`FUSED_BIRNN_AUTOTUNE=0`, CUDA-graph capture, torch.jit
    tracing), as before measuring existed, and what a measurement keeps unless another candidate is
    `clearly_faster`. CUDA: our kernels with the planner's plan ("triton") where they run the layer's dtype,
    else our PyTorch path. CPU: ATen's kernel for LSTM and GRU, and for the Elman cell in inference and on
    sequences shorter than `ATEN_MAX_TRAINING_STEPS`, except with `lengths=` (ATen served only packed input
    there); our PyTorch path otherwise."""
    if key.device != "cpu":
        from .. import functional

        return "triton" if (key.autocast or key.dtype) in functional.TRITON_CUDA_DTYPES else "torch"
    if key.cell in ("LSTM", "GRU"):
        return REFERENCE
    if key.rows == "lengths":
        return "torch"
    return REFERENCE if (not key.grad or steps < ATEN_MAX_TRAINING_STEPS) else "torch"


def _unseen(key: Key, module, x: Tensor, steps: int, weights: list[Tensor]) -> Decision | str:
    """A key not in memory: the decision file's, else a measured one; the default where nothing may be
    measured (the default is not kept: a later call that may measure does)."""
    default = default_choice(key, steps)
    if not measuring() or key.batch == 0:
        return default
    device = x.device
    with _LOCK:
        _load(device.type)
        decision = _DECISIONS.get(key)
        if decision is not None:
            return decision
        if paused(device):
            return default
        probe = ModuleProbe(module, key, device, weights)
        decision = decide(key, device, candidates(key, device), default, probe)
        _DECISIONS[key] = decision
        _save(device.type)
    return decision


def candidates(key: Key, device: torch.device) -> list[str]:
    """The candidates of a key on `device`: nn's kernel ("aten") first, then ours: on CUDA the kernels'
    plans (`kernel_plans`) where they run the layer's dtype, else our PyTorch path; on a CPU our PyTorch
    path (the interpreter's kernels are never timed)."""
    ours = kernel_plans(key, device) if device.type == "cuda" else []
    return [REFERENCE] + (ours or ["torch"])


def kernel_plans(key: Key, device: torch.device) -> list[str]:
    """Our kernel plans worth timing for `key` on a CUDA `device`: the planner's ("triton") and up to
    `MAX_ALTERNATIVES` other splits (one program per group, half and twice the planner's S), the
    estimated fastest first, each named "triton:split=S"; only the planner's where `FUSED_BIRNN_SPLIT` is
    set (the user's split); none where the kernels do not run the layer's dtype."""
    from .. import functional
    from ..kernels import config as kc
    from ..kernels import launch

    dtype = key.autocast or key.dtype
    if dtype not in functional.TRITON_CUDA_DTYPES:
        return []
    names = ["triton"]
    if launch.split_override() is not None:
        return names
    limits = kc.device_limits(device)
    gates = kc.gate_count(key.cell)
    cell, proj = (None if gates == 1 else key.cell), (key.proj_size or None)
    H, B = key.hidden_size, key.batch
    base = kc.select_config(H, B, dtype, key.tf32, limits, None, cell, proj)
    S0 = base.programs_per_group(H)
    seen, alternatives = {base}, []
    for S in sorted({1, S0 // 2, 2 * S0} - {0, S0}):
        cfg = kc.select_config(H, B, dtype, key.tf32, limits, S, cell, proj)
        if cfg in seen or cfg.programs_per_group(H) != S:
            continue  # no plan with that S fits, or the same plan
        seen.add(cfg)
        est = sum(kc.estimate_step_us(cfg, H, B, dtype, key.tf32, limits, key.directions, gates,
                                      key.proj_size, forward=f)["us"] for f in (True, False))
        alternatives.append((est, f"triton:split={S}"))
    return names + [name for _, name in sorted(alternatives)[:MAX_ALTERNATIVES]]


def estimate_ms(name: str, key: Key, device: torch.device, steps: int) -> float | None:
    """The cost model's estimate for the recurrence of kernel plan `name` on the probe (forward, and
    backward for training; every layer, `steps` steps): an ESTIMATE (kernels/config.py), None for a
    candidate that is not one of our kernel plans."""
    from .. import functional
    from ..kernels import config as kc

    if not name.startswith("triton") or device.type != "cuda":
        return None
    dtype = key.autocast or key.dtype
    gates = kc.gate_count(key.cell)
    limits = kc.device_limits(device)
    cfg = kc.select_config(key.hidden_size, key.batch, dtype, key.tf32, limits, functional.plan_split(name),
                           None if gates == 1 else key.cell, key.proj_size or None)
    us = sum(kc.estimate_step_us(cfg, key.hidden_size, key.batch, dtype, key.tf32, limits, key.directions, gates,
                                 key.proj_size, forward=f)["us"] for f in ((True, False) if key.grad else (True,)))
    return us * steps * key.num_layers / 1e3


# ------------------------------------------------------------------------------------------ measuring
def measure_ms(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, list[float]]:
    """Each callable's time (ms) in every round, the callables interleaved round by round in alternating
    order (A B, B A, ...: a place in the round costs each alike): CUDA events on a GPU (what the GPU
    spends, launch gaps included), `time.perf_counter` on a CPU; at least `MIN_ROUNDS` rounds and
    `BUDGET_S` seconds, at most `MAX_ROUNDS`. The callables have run once already (warm-up). Tests replace
    this (`timer`; a single number per candidate stands for one round)."""
    names = list(fns)
    cuda = device.type == "cuda"
    budget = BUDGET_S.get(device.type, BUDGET_S["cpu"])
    samples: dict[str, list] = {n: [] for n in names}
    start, rounds = time.perf_counter(), 0
    while True:
        for n in names if rounds % 2 == 0 else names[::-1]:
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[n]()
                end.record()
                samples[n].append((begin, end))
            else:
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if (rounds >= MIN_ROUNDS and elapsed >= budget) or rounds >= MAX_ROUNDS:
            break
    if cuda:
        samples = {n: [b.elapsed_time(e) for b, e in pairs] for n, pairs in samples.items()}
    return samples


timer: Callable[[dict[str, Callable[[], object]], torch.device], dict[str, list[float] | float]] = measure_ms


def clearly_faster(fast: Sequence[float], slow: Sequence[float]) -> bool:
    """Whether the candidate timed `fast` (ms per round) beats the one timed `slow` in the same rounds by
    more than `MARGIN` in three rounds of four: the lower quartile of the per-round ratios slow / fast
    exceeds 1 + MARGIN. A median alone flips between near-equal candidates on a shared CPU (seen: 0.94x
    against nn.RNN in one process for a shape measured 1.13x in another); rounds are paired because a
    CPU's speed drifts between them."""
    ratios = sorted(s / f for f, s in zip(fast, slow) if f > 0)
    if not ratios:
        return False
    return ratios[len(ratios) // 4] > 1 + MARGIN


class Probe:
    """What `decide` runs: a candidate's outputs (and gradients) on fixed inputs (`run`), the same in float64
    (`truth`), the dtype's parity tolerance (`tolerance`), and the probe's `steps` and `batch`."""

    def run(self, name: str) -> list[Tensor]:
        raise NotImplementedError

    def truth(self) -> list[Tensor]:
        raise NotImplementedError

    def tolerance(self) -> float:
        raise NotImplementedError

    names: Sequence[str] = ()
    steps: int = 0
    batch: int = 0


class ModuleProbe(Probe):
    """A probe of `module` for `key` on `device`: `x [T, B, I]` (T = `key.steps`, B = `key.batch`), random
    states and, for rows with lengths, lengths from T down (`key.rows` "packed": x packed with them, run as
    `FusedRNNBase._forward_packed` runs a PackedSequence; "lengths": run as a `lengths=` call); the module's
    weights detached (so neither the probe's forward nor its backward touches the user's graph or
    `.grad`), each requiring grad as the module's does; for training an upstream gradient for every
    output. Inputs come from a private generator (the user's random streams are untouched). `run(name)`
    returns the outputs and, for training, the gradients of the input, the states and every trainable
    weight (`torch.autograd.grad`: nothing accumulates), under identity saved-tensor hooks (a user's, e.g.
    activation checkpointing's, never see the probe)."""

    def __init__(self, module, key: Key, device: torch.device, weights: list[Tensor]):
        self.module, self.key, self.device = module, key, device
        self.steps, self.batch = key.steps, key.batch
        gen = torch.Generator().manual_seed(0)
        T, B, dtype = key.steps, key.batch, key.dtype

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        layers = key.num_layers * key.directions
        self.x = randn(T, B, key.input_size)
        self.states = tuple(randn(layers, B, size) for size in module._state_sizes())
        self.lengths = self.batch_sizes = None
        width = key.directions * (key.proj_size or key.hidden_size)
        self.upstream = [randn(T, B, width)] + [randn(*s.shape) for s in self.states]
        if key.rows:
            lengths = torch.tensor([max(1, T - (b * T) // B) for b in range(B)])  # descending: packed as sorted
            self.lengths = lengths.to(device)
            if key.rows == "packed":
                packed = pack_padded_sequence(self.x, lengths)
                self.x, self.batch_sizes = packed.data, packed.batch_sizes
                self.upstream[0] = pack_padded_sequence(self.upstream[0], lengths).data
        self.weights = [w.detach().requires_grad_(key.grad and w.requires_grad) for w in weights]

    def _inputs(self, dtype: torch.dtype | None = None):
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        grad = self.key.grad
        x = cast(self.x).detach().requires_grad_(grad)
        states = tuple(cast(s).detach().requires_grad_(grad) for s in self.states)
        weights = [cast(w).detach().requires_grad_(w.requires_grad) if dtype is not None else w for w in self.weights]
        return x, states, weights

    def _call(self, name: str, dtype: torch.dtype | None = None) -> list[Tensor]:
        x, states, weights = self._inputs(dtype)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(self.key.grad):
            if self.batch_sizes is not None:
                out, finals = self.module._run_packed(name, x, self.batch_sizes, states, weights, probe=True)
            else:
                out, finals = self.module._run(name, x, states, self.lengths, weights, probe=True)
            outputs = [out, *finals]
            if not self.key.grad:
                return [t.detach() for t in outputs]
            leaves = [x, *states] + [w for w in weights if w.requires_grad]
            upstream = [u.to(o.dtype) for u, o in zip(self.upstream, outputs)]
            grads = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
        return [t.detach() for t in outputs] + [g if g is None else g.detach() for g in grads]

    def run(self, name: str) -> list[Tensor]:
        return self._call(name)

    def truth(self) -> list[Tensor]:
        """nn's kernel in float64 on the same inputs, outside autocast (our PyTorch path where nn's kernel
        has no float64)."""
        with torch.autocast(self.device.type, enabled=False):
            try:
                return self._call(REFERENCE, torch.float64)
            except RuntimeError:
                return self._call("torch", torch.float64)

    def tolerance(self) -> float:
        from ..bench.parity import tolerance

        return tolerance(self.key.autocast or self.key.dtype, self.device, self.key.tf32)


def agree(got: list[Tensor], want: list[Tensor] | None, truth: Callable[[], list[Tensor]], tol: float) -> str | None:
    """The bench's parity criterion (`fused_birnn.bench.parity.check_parity`) tensor by tensor: within
    `tol` (scaled max error) of nn's kernel (`want`; None where it could not run), or no further from the
    float64 `truth()` than `max(tol, 2 x` nn's kernel's own distance from it`)`. None when every tensor
    passes, else what failed."""
    from ..bench.parity import scaled_error

    exact = None
    for i, value in enumerate(got):
        ref = None if want is None else want[i]
        err = None if want is None else scaled_error(value, ref)
        if err is not None and err <= tol:
            continue
        if exact is None:
            exact = truth()
        err_truth = scaled_error(value, exact[i])
        bound = tol if ref is None else max(tol, 2 * scaled_error(ref, exact[i]))
        if not err_truth <= bound:
            what = "output" if i == 0 else f"tensor {i}"
            against = (f"{err:.2g} from nn's kernel, " if err is not None else "") + f"{err_truth:.2g} from float64"
            return f"{what}: scaled error {against} (tolerance {tol:.0g})"
    return None


def decide(key: Key, device: torch.device, names: list[str], default: str, probe: Probe) -> Decision:
    """Run every candidate in `names` once on `probe` (nn's kernel, "aten", first: the reference), reject
    those of ours that raise or disagree with it (`agree`; a warning names the shape, the plan and the
    error, once), time the rest (`timer`) and rank them by median time, fastest first, except that the
    `default` comes first unless the fastest is `clearly_faster` than it."""
    t0 = time.perf_counter()
    rejected: dict[str, str] = {}
    results: dict[str, list[Tensor]] = {}
    for name in names:
        try:
            results[name] = probe.run(name)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run this shape is not a candidate
            rejected[name] = f"raised {type(e).__name__}: {str(e)[:200]}"
    want = results.get(REFERENCE)
    tol = probe.tolerance()
    for name in [n for n in results if n != REFERENCE]:
        problem = agree(results[name], want, probe.truth, tol)
        if problem is not None:
            rejected[name] = f"disagrees with nn's kernel: {problem}"
            del results[name]
    survivors = list(results)
    samples = timer({n: (lambda n=n: probe.run(n)) for n in survivors}, device) if len(survivors) > 1 else {}
    samples = {n: [float(v)] if isinstance(v, (int, float)) else [float(t) for t in v] for n, v in samples.items()}
    times = {n: statistics.median(samples[n]) if n in samples else float("nan") for n in survivors}
    ranking = sorted(survivors, key=lambda n: times[n])
    if default in ranking and ranking[0] != default and not clearly_faster(samples[ranking[0]], samples[default]):
        ranking.remove(default)  # the default stays unless another candidate is clearly faster
        ranking.insert(0, default)
    instead = ranking[0] if ranking else "torch"
    for name, why in rejected.items():
        if name != REFERENCE:
            _warn_once(f"{key}/{name}", f"fused_birnn: backend='auto' will not run {name} for {key.describe()}: "
                                        f"{why}. This shape runs {instead} instead.")
    estimates = {n: est for n in names if (est := estimate_ms(n, key, device, probe.steps)) is not None}
    return Decision(key, ranking, times, estimates, rejected, {"steps": probe.steps, "batch": probe.batch},
                    default, round(time.perf_counter() - t0, 3), "measured",
                    datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ------------------------------------------------------------------------------------------ the files
def cache_dir() -> Path | None:
    """Where decision files live: `$FUSED_BIRNN_TUNE_CACHE` (None if it is 0/off/false/no or empty:
    memory only), else `$XDG_CACHE_HOME/fused_birnn`, else `~/.cache/fused_birnn`."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        value = value.strip()
        return None if not value or value.lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_birnn"


def fingerprint(device_type: str) -> dict:
    """What a decision file holds decisions for: the schema, fused_birnn, torch and triton versions; on
    CUDA the CUDA and cuDNN versions and the GPU driver (GPU names are in the keys); on a CPU its model."""
    import triton

    from .. import __version__

    fp = {"schema": SCHEMA, "device": device_type, "fused_birnn": __version__, "torch": torch.__version__,
          "triton": triton.__version__}
    if device_type == "cuda":
        fp.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    else:
        fp.update(cpu=cpu_model(), machine=platform.machine())
    return fp


@lru_cache(maxsize=None)
def _driver_version() -> str:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        lines = out.stdout.strip().splitlines()
        return lines[0].strip() if out.returncode == 0 and lines else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what `platform` knows): part of a CPU's cache
    fingerprint here and of the bench's stamp."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_file(device_type: str) -> Path | None:
    """The decision file of this environment for a device kind ("cpu", "cuda"), None if memory only."""
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(fingerprint(device_type), sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"decisions-{device_type}-{digest}.json"


def _read(path: Path, device_type: str) -> list[Decision] | None:
    """The decisions in `path`, or None (missing; or corrupt or foreign: with a warning, once)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # (the folder's fate is told when it is written)
        return None
    except OSError as e:
        _warn_once(f"read {path}", f"fused_birnn: cannot read the tuning cache {path} ({e}); ignoring it")
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {SCHEMA}")
        if data.get("fingerprint") != fingerprint(device_type):
            raise ValueError(f"written for {data.get('fingerprint')}, not this environment")
        return [Decision.from_json(d) for d in data["decisions"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        _warn_once(f"read {path}", f"fused_birnn: ignoring the tuning cache {path}: {type(e).__name__}: "
                                   f"{str(e)[:200]} (delete it, or set {CACHE_ENV} to move it)")
        return None


def _load(device_type: str) -> None:
    """Read the decision file of `device_type` once per process (memory wins over it)."""
    if device_type in _LOADED:
        return
    _LOADED.add(device_type)
    path = cache_file(device_type)
    for d in (_read(path, device_type) or []) if path is not None else []:
        _DECISIONS.setdefault(d.key, d)


def _save(device_type: str) -> None:
    """Write this process's decisions of `device_type` into its file, merged with what another process
    wrote there meanwhile (ours win), atomically; a warning, once, where it cannot be written."""
    path = cache_file(device_type)
    if path is None:
        return
    on_disk = {d.key: d for d in (_read(path, device_type) or [])}
    on_disk.update({k: d for k, d in _DECISIONS.items() if (k.device == "cpu") == (device_type == "cpu")})
    payload = {"schema": SCHEMA, "fingerprint": fingerprint(device_type),
               "decisions": [d.to_json() for d in on_disk.values()]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _warn_once(f"write {path}", f"fused_birnn: cannot write the tuning cache {path} ({e}); decisions are "
                                    f"kept in memory only (set {CACHE_ENV} to another folder, or 0)")


# ------------------------------------------------------------------------------------------ showing
def decisions(include_disk: bool = True) -> list[dict]:
    """Every decision known to this process (and, with `include_disk`, in this environment's decision
    files), as JSON-able dicts: `Decision.to_json()` plus `source`, `key_text` (readable) and `ratios`
    (nn's kernel's time / each candidate's: > 1 faster than nn's)."""
    with _LOCK:
        if include_disk:
            _load("cpu")
            if torch.cuda.is_available():
                _load("cuda")
        found = list(_DECISIONS.values())
    out = []
    for d in found:
        row = d.to_json()
        row["source"], row["key_text"] = d.source, d.key.describe()
        ref = d.times_ms.get(REFERENCE)
        row["ratios"] = {n: ref / t for n, t in d.times_ms.items() if ref and t and t == t}
        out.append(row)
    return out


def format_decisions(rows: list[dict] | None = None) -> str:
    """`decisions()` as text: per key the choice, then each candidate's measured probe time (ms), its ratio
    (nn's kernel's time / its), for our kernel plans the cost model's estimate (est., an estimate) and the
    measured time per layer and step beside it, and what was rejected and why."""
    rows = decisions() if rows is None else rows
    if not rows:
        return "no decisions yet"
    lines = []
    for r in rows:
        probe = r.get("probe") or {}
        steps_layers = max(1, probe.get("steps", 0) * r["key"]["num_layers"])
        lines.append(f"{r['key_text']}: runs {r['ranking'][0] if r['ranking'] else 'torch'}  "
                     f"[probe T={probe.get('steps')} B={probe.get('batch')}, decided in {r['cost_s']:.2f} s, "
                     f"{r['source']}]")
        for name in r["ranking"]:
            ms = r["times_ms"].get(name)
            text = f"    {name:<18} {ms:9.3f} ms" if ms == ms else f"    {name:<18}  (only candidate)"
            if name in r["ratios"]:
                text += f"  {r['ratios'][name]:.2f}x nn's kernel"
            est = r["estimates_ms"].get(name)
            if est is not None:
                text += (f"  (est. {est:.3f} ms for the recurrence alone; measured "
                         f"{ms * 1e3 / steps_layers:.2f} us, estimated {est * 1e3 / steps_layers:.2f} us per "
                         f"layer-step)")
            lines.append(text)
        for name, why in r["rejected"].items():
            lines.append(f"    {name:<18} rejected: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_birnn.tune",
                                 description="backend='auto''s decisions: which implementation runs each call shape, "
                                             "with the measured times")
    ap.add_argument("--show", action="store_true", help="print the decisions in this environment's decision files")
    ap.add_argument("--json", action="store_true", help="print them as JSON")
    ap.add_argument("--clear", action="store_true", help="delete this environment's decision files")
    args = ap.parse_args(argv)
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    files = {k: cache_file(k) for k in kinds}
    if args.clear:
        for path in files.values():
            if path is not None and path.exists():
                path.unlink()
                print(f"deleted {path}")
        return 0
    if not (args.show or args.json):
        ap.print_help()
        return 0
    rows = decisions()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    where = "; ".join(f"{k}: {p if p is not None else 'memory only (' + CACHE_ENV + '=0)'}" for k, p in files.items())
    print(f"decision files: {where}")
    print(f"measuring: {'on' if measuring() else 'off (' + AUTOTUNE_ENV + '=0)'}")
    print(format_decisions(rows))
    return 0


