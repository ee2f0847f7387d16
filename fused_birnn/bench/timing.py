"""Timers: CUDA events through `triton.testing.do_bench` (median), and a wall-clock timer for CPU.

Both time callables that rotate among a few pre-generated inputs (`Rotating`), so a timed call does not
reuse the previous call's input buffers.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .parity import make_inputs
from .suites import Config

NUM_INPUT_SETS = 3  # inputs rotated through by the timed callables


class Rotating:
    """Cycles through pre-generated `(x, h0, grad_output, grad_h_n)` sets for one configuration."""

    def __init__(self, cfg: Config, device: torch.device | str, n: int = NUM_INPUT_SETS, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.sets = []
        for _ in range(n):
            x, h0 = make_inputs(cfg, device, generator=gen)
            gy = torch.randn(*x.shape[:-1], 2 * cfg.hidden_size, generator=gen).to(device, x.dtype)
            ghn = torch.randn(*h0.shape, generator=gen).to(device, x.dtype)
            self.sets.append((x.requires_grad_(True), h0.requires_grad_(True), gy, ghn))
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def leaves(self) -> list[torch.Tensor]:
        return [t for s in self.sets for t in s[:2]]


def forward_fn(model: nn.Module, inputs: Rotating) -> Callable[[], None]:
    """Forward only, no autograd graph (inference)."""

    def run():
        x, h0, _, _ = inputs.next()
        with torch.no_grad():
            model(x, h0)

    return run


def forward_backward_fn(model: nn.Module, inputs: Rotating) -> Callable[[], None]:
    """Forward, then backward of `output` and `h_n` into the input, h0 and every parameter."""

    def run():
        x, h0, gy, ghn = inputs.next()
        out, h_n = model(x, h0)
        torch.autograd.backward((out, h_n), (gy, ghn))

    return run


def grad_leaves(model: nn.Module, inputs: Rotating) -> list[torch.Tensor]:
    return list(model.parameters()) + inputs.leaves()


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


# ---------------------------------------------------------------------------------------------- CUDA
def cuda_time_ms(fn: Callable[[], None], *, grad_to_none: Sequence[torch.Tensor] | None = None,
                 warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median of CUDA-event timings (`triton.testing.do_bench`, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def cuda_peak_memory(fn: Callable[[], None], *, grad_to_none: Sequence[torch.Tensor] = ()) -> dict:
    """Peak allocated bytes during one call: absolute, and above what was allocated before it."""
    clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    clear_grads(grad_to_none)
    return {"peak_bytes": int(peak), "peak_extra_bytes": int(peak - before)}


# ----------------------------------------------------------------------------------------------- CPU
class OthersLoad:
    """Share of the machine's CPUs used by *other* processes between `start()` and `stop()` (percent):
    the non-idle time in /proc/stat minus this process's own CPU time. None where /proc/stat is missing."""

    def __init__(self):
        self._t0 = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def start(self) -> "OthersLoad":
        try:
            self._t0 = self._sample()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def stop(self) -> float | None:
        if self._t0 is None:
            return None
        busy1, own1, wall1 = self._sample()
        busy0, own0, wall0 = self._t0
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others_s = (busy1 - busy0) / hz - (own1 - own0)
        cpus = os.cpu_count() or 1
        return round(max(0.0, 100.0 * others_s / max((wall1 - wall0) * cpus, 1e-9)), 1)


def cpu_compare_ms(fns: dict[str, Callable[[], None]], *, resets: dict[str, Callable[[], None]] | None = None,
                   warmup: int = 2, min_runs: int = 5, max_runs: int = 50, min_time_s: float = 1.0) -> dict:
    """Wall-clock (`time.perf_counter`) medians of several callables, interleaved run by run so that
    drifts of a shared CPU (frequency, other load) hit all of them alike. `resets[name]`, if given, runs
    before each call of `fns[name]`, untimed. Returns `{name: {"median_ms", "min_ms", "iqr_ms", "runs", "times_ms"}}`."""
    resets = resets or {}
    noop = lambda: None  # noqa: E731
    for _ in range(warmup):
        for name, fn in fns.items():
            resets.get(name, noop)()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    runs = 0
    while runs < min_runs or (runs < max_runs and time.perf_counter() - start < min_time_s):
        for name, fn in fns.items():
            resets.get(name, noop)()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        runs += 1
    out = {}
    for name, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        out[name] = {"median_ms": statistics.median(ms), "min_ms": ms[0], "iqr_ms": q[2] - q[0], "runs": len(ms),
                     "times_ms": [t * 1e3 for t in ts]}  # in run order: round i of every callable is adjacent
    return out


def paired_ratio(num_ms: Sequence[float], den_ms: Sequence[float]) -> float:
    """Median over rounds of `num[i] / den[i]`: on a CPU whose speed drifts (shared hosts), the two runs
    of one round see the same machine, so their ratio is steadier than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(num_ms, den_ms))
