"""What the forward and backward launchers share: the device guard, the on-chip `W_hh` slices, the
barrier counters, the error flag and where its error surfaces, and the two ways to run the steps.

Two modes run the same kernel code (kernels/forward.py, kernels/backward.py):

* persistent (`BARRIER=True`): one launch runs every step; with SPLIT > 1 the programs of a group meet
  at the in-kernel barrier of kernels/sync.py each step. Needs all programs resident at once (the plan
  sees to it, kernels/config.py).
* launch per step (`BARRIER=False`): one launch per step, the launch boundary is the barrier. Used under
  `TRITON_INTERPRET=1` whenever SPLIT > 1 (the interpreter runs programs one after another, so an
  in-kernel barrier would never return there), and on a GPU where no plan fits one wave.

Errors of the persistent split kernel (a barrier wait that ran out, kernels/sync.py) surface without a
host sync on the fast path: the kernel ORs a bit into a per-device int32 error flag (device memory); after
each such launch the launcher queues a non-blocking copy of the flag to pinned host memory and records an
event. Every later launch of either recurrence on that device first looks at the last copy whose event has
completed (`Event.query()`, no sync) and raises `RuntimeError` if a bit is set, then clears the flag.
So the error is raised by the first recurrence launch after the failed kernel has finished (at the latest
by `check_errors()`, which synchronizes), and the failed launch's outputs are NaN from the failed step on,
so nothing silently wrong escapes even before that. While a CUDA graph is being captured the copy and
the check are skipped (a replayed failure is found by the next eager launch or `check_errors()`).
On the CPU (interpreter) the copy is immediate and the same rule applies.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .sync import ERR_BARRIER_TIMEOUT

SPLIT_ENV = "FUSED_BIRNN_SPLIT"


def split_override() -> int | None:
    """`FUSED_BIRNN_SPLIT=S` (read at every call): force S cooperating programs per group wherever the
    plan can honour it; unset or empty: the plan decides."""
    v = os.environ.get(SPLIT_ENV, "").strip()
    if not v:
        return None
    try:
        s = int(v)
    except ValueError:
        raise ValueError(f"{SPLIT_ENV}={v!r}: expected a positive integer") from None
    if s < 1:
        raise ValueError(f"{SPLIT_ENV}={v!r}: expected a positive integer")
    return s


def device_guard(t: torch.Tensor):
    """`torch.cuda.device(t.device)` for a CUDA tensor (Triton launches on the current device and its
    current stream, not on the tensors' device), a no-op context otherwise."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def unit_slices(w: torch.Tensor, blocks: int, split: int, units: int, block_n: int, block_k: int,
                chunks: int) -> torch.Tensor:
    """`w [D, blocks*R, K]` (`blocks` blocks of R rows: a weight's gates) -> `[D, split, chunks, blocks,
    block_n, block_k]`: `[d, p, c, b, n, k] = w[d][b*R + p*units + n, c*block_k + k]`, zero where that
    row or column does not exist: program p's rows `[p*units, (p+1)*units)` of every block, their columns
    in `chunks` chunks of `block_k`."""
    D, BR, K = w.shape
    R = BR // blocks
    rows = w.new_zeros((D, blocks, split * units, K))
    rows[:, :, :R] = w.view(D, blocks, R, K)
    out = w.new_zeros((D, blocks, split, block_n, chunks * block_k))
    out[:, :, :, :units, :K] = rows.view(D, blocks, split, units, K)
    return out.view(D, blocks, split, block_n, chunks, block_k).permute(0, 2, 4, 1, 3, 5)


def product_slices(w: torch.Tensor, blocks: int, split: int, units: int, block_n: int, block_k: int,
                   chunks: int) -> torch.Tensor:
    """The operand of `A @ w[d]^T` restricted to each program's rows (kernels/product.py,
    `gather_product`): `[D, split, chunks, block_k, blocks*block_n]`, `[d, p, c, k, b*block_n + n] =
    w[d][b*R + p*units + n, c*block_k + k]` (columns gate-major: `blocks` gates side by side)."""
    D = w.shape[0]
    s = unit_slices(w, blocks, split, units, block_n, block_k, chunks)  # [D, S, C, blocks, bn, bk]
    return s.permute(0, 1, 2, 5, 3, 4).contiguous().view(D, split, chunks, block_k, blocks * block_n)


def row_slices(w: torch.Tensor, blocks: int, split: int, units: int, block_n: int, block_c: int,
               chunks: int) -> torch.Tensor:
    """The operand of `sum_b dz_b @ w[d][b*R + p's rows, :]` by column chunks (kernels/product.py,
    `scatter_product`): `[D, split, chunks, blocks, block_n, block_c]` = `unit_slices`, contiguous."""
    return unit_slices(w, blocks, split, units, block_n, block_c, chunks).contiguous()


def cooperative(cfg, split: int, device: torch.device) -> bool:
    """Whether a persistent launch of plan `cfg` with `split` programs per group asks for a cooperative
    launch: on a CUDA device, S > 1 (programs wait for each other), unless the plan says no."""
    return device.type == "cuda" and split > 1 and cfg.cooperative is not False


def _launch(kernel, grid, *args, **kwargs):
    """One launch (tests replace it to run a grid's programs as threads)."""
    kernel[grid](*args, **kwargs)


def run_steps(kernel, grid, args: tuple, ints_after: tuple, n_steps: int, persistent: bool,
              max_spins: int, common: dict, phases: tuple[int, ...] = (), cooperative: bool = False,
              what: str = "") -> None:
    """Launch `kernel` over `n_steps` processing steps: once (persistent) or once per step. `args` are
    the arguments before (begin, end, max_spins); `ints_after` the ones after them. `phases`: a step that
    needs more than one exchange (a projected LSTM split across programs: m, then h) runs, in the
    launch-per-step mode, as one launch per phase (`PHASE=` each of them: the launch boundary is then
    every barrier); empty: one launch per step, no PHASE argument.

    `cooperative` (a persistent split launch on a GPU): ask CUDA for a cooperative launch
    (`launch_cooperative_grid`, Triton 3.6 and 3.9: `CU_LAUNCH_ATTRIBUTE_COOPERATIVE`), which either
    makes every program of the grid resident at once or refuses to start; when it refuses (the grid does
    not fit the device as the plan estimated, MPS or MIG, another kernel holding SMs), the steps run one
    launch each instead (correct on any device, slower) and a warning naming `what` (the layer's shape)
    says so, once per shape. An error that the launch-per-step mode raises as well propagates."""
    if persistent:
        if not cooperative:
            _launch(kernel, grid, *args, 0, n_steps, max_spins, *ints_after, BARRIER=True, **common)
            return
        try:
            _launch(kernel, grid, *args, 0, n_steps, max_spins, *ints_after, BARRIER=True,
                    launch_cooperative_grid=True, **common)
            return
        except RuntimeError as e:  # refused at launch: nothing ran
            _warn_once(what, f"fused_birnn: the cooperative launch of {what} was refused ({e}); running it "
                             f"as one launch per step (slower). The grid needs every program resident at once: "
                             f"is the GPU shared (MPS, MIG, other kernels)?")
    for s in range(n_steps):
        for ph in phases or (None,):
            extra = {} if ph is None else {"PHASE": ph}
            _launch(kernel, grid, *args, s, s + 1, max_spins, *ints_after, BARRIER=False, **extra, **common)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class _ErrorFlag:
    def __init__(self, device: torch.device):
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if cuda else self.flag
        self.event = None  # completes once `host` holds the flag as of the last persistent split launch


_FLAGS: dict[torch.device, _ErrorFlag] = {}


def _key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def error_flag(device: torch.device) -> torch.Tensor:
    """The device's int32 error flag the persistent split kernels write into."""
    key = _key(device)
    if key not in _FLAGS:
        _FLAGS[key] = _ErrorFlag(key)
    return _FLAGS[key].flag


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _raise(state: _ErrorFlag, device: torch.device) -> None:
    code = int(state.host[0])
    if code:
        state.flag.zero_()
        if state.host is not state.flag:
            state.host.zero_()
        state.event = None
        causes = []
        if code & ERR_BARRIER_TIMEOUT:
            causes.append("a program of a split recurrence waited past its bound at a per-step barrier: "
                          "a cooperating program never arrived (not resident at once: another kernel, "
                          "MPS or MIG sharing the GPU, or a plan larger than the device)")
        raise RuntimeError(f"fused_birnn: an earlier recurrence launch on {device} failed ({'; '.join(causes)}"
                           f"; error code {code}); its outputs from the failed step on are NaN. Set "
                           f"FUSED_BIRNN_SPLIT=1 to run one program per group, which never waits.")


def raise_pending(device: torch.device) -> None:
    """Raise the error of an earlier, finished persistent split launch on `device` (no sync)."""
    state = _FLAGS.get(_key(device))
    if state is None or _capturing(device):
        return
    if state.event is not None and not state.event.query():
        return  # the copy of the flag has not landed yet: look again at the next launch
    _raise(state, device)


def after_launch(device: torch.device) -> None:
    """Queue the copy of the flag to host memory after a persistent split launch (no sync)."""
    state = _FLAGS[_key(device)]
    if state.host is state.flag or _capturing(device):
        return
    state.host.copy_(state.flag, non_blocking=True)
    state.event = torch.cuda.Event()
    state.event.record()


def check_errors(device: torch.device | str | None = None) -> None:
    """Wait for the device (one sync) and raise `RuntimeError` if any earlier recurrence launch on it
    failed. `device` None: every device with a flag."""
    devices = [_key(torch.device(device))] if device is not None else list(_FLAGS)
    for d in devices:
        state = _FLAGS.get(d)
        if state is None:
            continue
        if d.type == "cuda":
            torch.cuda.synchronize(d)
            state.host.copy_(state.flag)
            state.event = None
        _raise(state, d)
