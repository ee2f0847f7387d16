"""Timers: CUDA events through `triton.testing.do_bench` (median), and a wall-clock timer for CPU.

Both time callables that rotate among a few pre-generated inputs (`Rotating`), so a timed call does not
reuse the previous call's input buffers; each candidate reads them through its own cursor
(`Rotating.cursor`), so that in every round all candidates get the same input set.

CPU comparisons are symmetric (`cpu_compare_ms`): the candidates run interleaved, one call each per round,
the order flips every round (A B, B A, ...), and a ratio is taken per ABBA block (two rounds, one in each
order), so whatever the place in a round costs or saves cancels. Why, measured on the project's CPU
machine (2 shared cores, torch 2.13.0+cpu, 1 thread, forward, each shape's ratio run until its 95%
interval was within ±0.5% or 6 s): `torch.nn.RNN` timed against a second `nn.RNN` with the same weights
(an A/A test) in the fixed order used before (ours first, then nn.RNN) read 0.966-0.996 in 8 runs over 4
shapes (seed; H=64 B=32 T=32; H=128 B=8 T=32; H=64 B=8 T=8): the first slot lost 0.4-3.4%, the size of
the forward shortfalls (0.97-0.99x) that earlier CPU runs recorded for `fused_birnn.RNN`, which runs
nn.RNN's own ATen kernel there. In ABBA order the same A/A runs read 0.995-1.012. What is left is real:
with every candidate rotated through every place, `fused_birnn.RNN`'s Python before ATen's call cost
1-2% at H=64 B=32 T=32 (nn.RNN / ours 0.983-0.990, intervals excluding 1; ATen's function called
directly with our weights or nn.RNN's: the same time), and gained at tiny shapes (41 against 43 us a
call at T=1, H=1). Two modules running one kernel still differ by about ±1% (where their tensors lie):
read a forward ratio within 0.99-1.01 as parity.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .parity import make_grads, make_inputs, states
from .suites import Config

NUM_INPUT_SETS = 3  # inputs rotated through by the timed callables


class Rotating:
    """Cycles through pre-generated `(x, hx, grad_output, grad_states)` sets for one configuration: hx is
    h0 or the LSTM's `(h0, c0)`, grad_states `(grad_h_n[, grad_c_n])`."""

    def __init__(self, cfg: Config, device: torch.device | str, n: int = NUM_INPUT_SETS, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.sets = []
        for _ in range(n):
            x, hx = make_inputs(cfg, device, generator=gen)
            gy, gstates = make_grads(cfg, x, hx, generator=gen)
            for t in (x, *states(hx)):
                t.requires_grad_(True)
            self.sets.append((x, hx, gy, gstates))
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def cursor(self) -> "Rotating":
        """The same input sets, read from the first with an index of its own: give each timed candidate
        one, so that round i hands every candidate the same set."""
        other = object.__new__(Rotating)
        other.sets, other.i = self.sets, 0
        return other

    def leaves(self) -> list[torch.Tensor]:
        return [t for s in self.sets for t in (s[0], *states(s[1]))]


def forward_fn(model: nn.Module, inputs: Rotating) -> Callable[[], None]:
    """Forward only, no autograd graph (inference)."""

    def run():
        x, hx, _, _ = inputs.next()
        with torch.no_grad():
            model(x, hx)

    return run


def forward_backward_fn(model: nn.Module, inputs: Rotating) -> Callable[[], None]:
    """Forward, then backward of `output` and `h_n` (and `c_n`) into the input, h0 (c0) and every parameter."""

    def run():
        x, hx, gy, gstates = inputs.next()
        out, h_n = model(x, hx)
        torch.autograd.backward((out, *states(h_n)), (gy, *gstates))

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


def cuda_times_ms(fn: Callable[[], None], *, grad_to_none: Sequence[torch.Tensor] | None = None,
                  warmup_ms: int = 25, rep_ms: int = 100) -> list[float]:
    """Every CUDA-event timing of one `triton.testing.do_bench` window (L2 flushed between runs)."""
    import triton.testing

    return [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                      return_mode="all")]


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
CONFIDENCE = 0.95


@dataclass(frozen=True)
class StopRule:
    """How long to measure a ratio of two timings: until the bootstrap 95% interval of the ratio lies
    within `ratio * (1 ± bound)`, checked once at least `min_runs` rounds (and two ABBA blocks: four
    rounds) and `min_time_s` seconds are done, and again every `check_every` rounds or more (spacing grows
    by 25% per check); at most `max_runs` rounds or `max_time_s` seconds. What stops at a cap is flagged
    "did not converge"."""

    bound: float = 0.05
    min_runs: int = 11
    max_runs: int = 5000
    min_time_s: float = 1.0
    max_time_s: float = 20.0
    check_every: int = 5
    resamples: int = 1000

    def describe(self) -> str:
        return (f"ours and the reference alternate in ABBA order; measured until the bootstrap 95% interval of "
                f"the ratio lies within ±{self.bound:.0%} of it "
                f"(at least {self.min_runs} rounds and {self.min_time_s:g} s, at most {self.max_runs} rounds "
                f"or {self.max_time_s:g} s per mode)")


def ratio_interval(num: Sequence[float], den: Sequence[float], *, paired: bool, resamples: int = 1000,
                   confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """`(ratio, lo, hi)`: the ratio of two timing samples and its percentile-bootstrap interval.

    paired (`num[i]`, `den[i]` measured in the same round): ratio = median of `num[i] / den[i]`, the
    rounds resampled; unpaired: ratio = median(num) / median(den), each sample resampled on its own.
    Deterministic (`seed`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    q = ((1 - confidence) / 2, (1 + confidence) / 2)
    if paired:
        r = a / b
        stat = float(np.median(r))
        boot = np.median(r[rng.integers(0, len(r), (resamples, len(r)))], axis=1)
    else:
        stat = float(np.median(a) / np.median(b))
        boot = (np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
                / np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1))
    lo, hi = np.quantile(boot, q)
    return stat, float(min(lo, stat)), float(max(hi, stat))


def rel_halfwidth(ratio: float, lo: float, hi: float) -> float:
    """The larger distance from the ratio to an end of its interval, relative to the ratio."""
    return max(ratio - lo, hi - ratio) / ratio


def within_bound(ratio: float, lo: float, hi: float, bound: float) -> bool:
    return rel_halfwidth(ratio, lo, hi) <= bound + 1e-12


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
                   warmup: int = 2, rule: StopRule = StopRule(), pair: tuple[str, str] | None = ("ref", "ours"),
                   clock: Callable[[], float] = time.perf_counter) -> dict:
    """Wall-clock times of several callables, interleaved run by run (one round runs each once, in the
    order of `fns` on even rounds and reversed on odd ones: ABBA blocks) so that drifts of a shared CPU
    (frequency, other load) and the place in a round hit all of them alike, for as long as `rule` says.
    `resets[name]`, if given, runs before each call of `fns[name]`, untimed. `clock` is the timer (tests
    pass a fake one).

    With `pair = (num, den)` both in `fns`, the ratio is the median over ABBA blocks (rounds 2k and 2k+1,
    the two orders) of `(num_2k + num_2k+1) / (den_2k + den_2k+1)` (`abba_blocks`): a cost or saving of
    the place in a round cancels within each block. Rounds continue until the ratio's bootstrap 95%
    interval (over blocks) lies within `±rule.bound` of it (`StopRule`), checked from two blocks on.

    Returns `{"times": {name: {"median_ms", "min_ms", "iqr_ms", "runs", "times_ms"}}, "ratio": None or
    {"ratio", "ci95", "rel_halfwidth", "converged", "stop", "rounds", "elapsed_s"}}`; `stop` is
    "converged", "max_runs", "max_time", or "min_runs" (no pair to converge)."""
    resets = resets or {}
    noop = lambda: None  # noqa: E731
    names = list(fns)
    for w in range(warmup):
        for name in names if w % 2 == 0 else names[::-1]:
            resets.get(name, noop)()
            fns[name]()
    paired = pair is not None and all(n in fns for n in pair)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = clock()
    rounds, next_check, stop, interval = 0, max(rule.min_runs, 4), "", None

    def measure_ratio():
        return ratio_interval(*abba_blocks(times[pair[0]], times[pair[1]]), paired=True, resamples=rule.resamples)

    while True:
        # the order flips every round (A B, B A, ...): whatever the place in a round costs or saves (warm
        # caches, OpenMP threads still spinning, the bookkeeping between calls) falls on each candidate alike
        for name in names if rounds % 2 == 0 else names[::-1]:
            fn = fns[name]
            resets.get(name, noop)()
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
        rounds += 1
        elapsed = clock() - start
        if rounds >= rule.min_runs and elapsed >= rule.min_time_s:
            if not paired:
                stop = "min_runs"
                break
            if rounds >= next_check:
                interval = measure_ratio()
                if within_bound(*interval, rule.bound):
                    stop = "converged"
                    break
                # geometric spacing: the bootstrap's cost stays a fraction of the measuring
                next_check = max(rounds + rule.check_every, math.ceil(rounds * 1.25))
                interval = None
        if rounds >= rule.max_runs:
            stop = "max_runs"
            break
        if elapsed >= rule.max_time_s:
            stop = "max_time"
            break
    out: dict = {"times": {}, "ratio": None}
    for name, ms in times.items():
        srt = sorted(ms)
        q = statistics.quantiles(srt, n=4) if len(srt) >= 2 else [srt[0]] * 3
        out["times"][name] = {"median_ms": statistics.median(srt), "min_ms": srt[0], "iqr_ms": q[2] - q[0],
                              "runs": len(srt), "times_ms": ms}  # in run order: round i of every callable adjacent
    if paired:
        if interval is None:
            interval = measure_ratio()
        out["ratio"] = ratio_summary(interval, rule.bound, stop=stop, rounds=rounds, elapsed_s=clock() - start)
    return out


def abba_blocks(num: Sequence[float], den: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-round times of two callables regrouped into ABBA blocks: the sums over rounds 2k and 2k+1 (one
    round in each order); a last unpaired round is left out. Fewer than two rounds: the rounds themselves."""
    n = min(len(num), len(den))
    if n < 2:
        return list(num[:n]), list(den[:n])
    k = n // 2 * 2
    return ([num[i] + num[i + 1] for i in range(0, k, 2)], [den[i] + den[i + 1] for i in range(0, k, 2)])


def ratio_summary(interval: tuple[float, float, float], bound: float, **extra) -> dict:
    """JSON fields of a measured ratio: value, 95% interval, its relative half-width, converged."""
    r, lo, hi = interval
    return {"ratio": r, "ci95": [lo, hi], "rel_halfwidth": rel_halfwidth(r, lo, hi),
            "converged": within_bound(r, lo, hi, bound), **extra}
