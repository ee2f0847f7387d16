"""The split recurrence (S cooperating programs per group) on the CPU.

* Parity: S forced to 1, 2 and 3 at odd H (7, 33, 50), fp64/fp32/fp16, tanh and ReLU, with and without
  lengths, forward and backward, through the launch-per-step mode (the interpreter runs programs one
  after another, so the barrier is the launch boundary there) and through `FUSED_BIRNN_SPLIT`.
  Without a K split (`split_k=0`) the results are bitwise equal to S = 1: every program reduces over K
  in the same order, whatever S. A narrow product whose K the warps split (the default `split_k`) sums
  KS partial products, another rounding: those plans are checked against the float64 reference.
* Determinism: two runs are bitwise equal.
* The barrier protocol itself (kernels/sync.py): the programs of one persistent launch run concurrently
  as threads of a test-only grid executor; and with one program missing, the others end in the
  documented error (NaN outputs from the failed step on, the error flag, a RuntimeError at the next
  launch or at `check_errors()`), not a hang.
"""

from __future__ import annotations

import inspect
import itertools
import threading

import pytest
import torch

from fused_birnn.functional import INTERPRETER
from fused_birnn.kernels import launch
from fused_birnn.kernels.backward import birnn_backward
from fused_birnn.kernels.config import RecurrenceConfig, select_config
from fused_birnn.kernels.forward import birnn_forward

from test_kernels import assert_guard_untouched, guarded, loop_reference

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2}


def split_config(S: int, H: int, on_chip: bool = True, block_k: int | None = None, **kw) -> RecurrenceConfig:
    block_h = max(16, 1 << (-(-H // S) - 1).bit_length())
    return RecurrenceConfig(16, block_h, on_chip, split=S, block_k=block_k, **kw)


def make(T, B, H, D, dt, lengths=False):
    x_proj = torch.randn(T, B, D * H, dtype=torch.float64).to(dt)
    w_hh = (torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5).to(dt)
    h0 = torch.randn(D, B, H, dtype=torch.float64).to(dt)
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,))
        lens[0] = T
    return x_proj, w_hh, h0, lens


def run_both(x_proj, w_hh, h0, lens, relu, cfg, g_out=None, g_hn=None):
    T, B, DH = x_proj.shape
    D, H = w_hh.shape[:2]
    big_out, out = guarded((T, B, DH), x_proj.dtype)
    out.zero_() if lens is not None else None
    big_hn, h_n = guarded((D, B, H), x_proj.dtype)
    birnn_forward(x_proj, w_hh, h0, out, h_n, relu=relu, lengths=lens, config=cfg)
    if lens is None:
        assert_guard_untouched(big_out, out)
    assert_guard_untouched(big_hn, h_n)
    g_out = torch.randn_like(out) if g_out is None else g_out
    g_hn = torch.randn_like(h_n) if g_hn is None else g_hn
    big_gp, gp = guarded((T, B, DH), x_proj.dtype)
    gp.zero_() if lens is not None else None
    big_gh0, gh0 = guarded((D, B, H), x_proj.dtype)
    birnn_backward(out, g_out, g_hn, w_hh, gp, gh0, relu=relu, lengths=lens, config=cfg)
    if lens is None:
        assert_guard_untouched(big_gp, gp)
    assert_guard_untouched(big_gh0, gh0)
    return [out.clone(), h_n.clone(), gp.clone(), gh0.clone()], g_out, g_hn


def reference(x_proj, w_hh, h0, lens, relu, g_out, g_hn):
    """float64 autograd through the loop definition (lengths: per-row runs of the valid prefix)."""
    x = x_proj.double().requires_grad_()
    h = h0.double().requires_grad_()
    T, B, DH = x.shape
    D, H = w_hh.shape[:2]
    if lens is None:
        out, h_n = loop_reference(x, w_hh.double(), h, relu)
    else:
        outs, hns = [], []
        for b in range(B):
            n = int(lens[b])
            o, hn = loop_reference(x[:n, b:b + 1], w_hh.double(), h[:, b:b + 1], relu)
            outs.append(torch.cat([o, o.new_zeros(T - n, 1, DH)]))
            hns.append(hn)
        out, h_n = torch.cat(outs, 1), torch.cat(hns, 1)
    gx, gh0 = torch.autograd.grad((out * g_out.double()).sum() + (h_n * g_hn.double()).sum(), (x, h))
    return [out, h_n, gx, gh0]


@pytest.mark.parametrize("lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.float16], ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("H", [7, 33, 50])
def test_split_parity_and_bitwise_equal_to_one_program(H, dt, relu, lengths):
    T, B, D = 4, 3, 2
    x_proj, w_hh, h0, lens = make(T, B, H, D, dt, lengths)
    one, g_out, g_hn = run_both(x_proj, w_hh, h0, lens, relu, split_config(1, H))
    expected = reference(x_proj, w_hh, h0, lens, relu, g_out, g_hn)
    for name, got, exp in zip(["out", "h_n", "grad_pre", "grad_h0"], one, expected):
        torch.testing.assert_close(got.double(), exp, atol=TOL[dt], rtol=TOL[dt], msg=lambda m: f"S=1 {name}: {m}")
    for S in (2, 3):
        got, _, _ = run_both(x_proj, w_hh, h0, lens, relu, split_config(S, H, split_k=0), g_out, g_hn)
        for name, a, b in zip(["out", "h_n", "grad_pre", "grad_h0"], got, one):
            assert torch.equal(a, b), f"S={S} {name} differs from S=1 (max {(a - b).abs().max()})"
        got, _, _ = run_both(x_proj, w_hh, h0, lens, relu, split_config(S, H), g_out, g_hn)
        for name, a, exp in zip(["out", "h_n", "grad_pre", "grad_h0"], got, expected):
            torch.testing.assert_close(a.double(), exp, atol=TOL[dt], rtol=TOL[dt],
                                       msg=lambda m: f"S={S} (K split) {name}: {m}")


@pytest.mark.parametrize("S,block_k", [(2, 16), (3, 16), (4, 32)])
def test_streamed_split_parity(S, block_k):
    """W slices streamed in K chunks (the large-H plan) at H=50: K chunks with a partial last one."""
    T, B, H, D = 3, 17, 50, 2
    x_proj, w_hh, h0, lens = make(T, B, H, D, torch.float64, lengths=True)
    got, g_out, g_hn = run_both(x_proj, w_hh, h0, lens, True, split_config(S, H, False, block_k))
    expected = reference(x_proj, w_hh, h0, lens, True, g_out, g_hn)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bitwise_deterministic():
    x_proj, w_hh, h0, lens = make(4, 5, 33, 2, torch.float32, lengths=True)
    a, g_out, g_hn = run_both(x_proj, w_hh, h0, lens, False, split_config(3, 33))
    b, _, _ = run_both(x_proj, w_hh, h0, lens, False, split_config(3, 33), g_out, g_hn)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_env_override_is_read_per_call(monkeypatch):
    """FUSED_BIRNN_SPLIT=S picks S programs per group at the next call (launch per step under the
    interpreter), through the whole module, with the numbers of S = 1 (to rounding: a narrow product
    may split its K among the warps)."""
    import fused_birnn

    seen = []
    real = launch.run_steps

    def spy(kernel, grid, *a, **kw):
        seen.append(grid[0])
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(launch, "run_steps", spy)
    m = fused_birnn.RNN(3, 33, 1, bidirectional=True, dtype=torch.float64, backend="triton")
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    monkeypatch.delenv(launch.SPLIT_ENV, raising=False)
    ref = m(x)[0]
    assert seen == [1]
    for S in (2, 3):
        monkeypatch.setenv(launch.SPLIT_ENV, str(S))
        torch.testing.assert_close(m(x)[0], ref, atol=1e-13, rtol=1e-13)
        assert seen[-1] == S
    monkeypatch.setenv(launch.SPLIT_ENV, "zero")
    with pytest.raises(ValueError, match="FUSED_BIRNN_SPLIT"):
        m(x)


def test_config_checked():
    x_proj, w_hh, h0, _ = make(2, 2, 50, 2, torch.float64)
    out, h_n = torch.empty_like(x_proj), torch.empty_like(h0)
    with pytest.raises(ValueError, match="split=2 with block_h=16"):
        birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False, config=RecurrenceConfig(16, 16, True, split=2))


# ---------------------------------------------------------------------------------------------------------
# the barrier protocol with concurrent programs (a test-only grid executor)
# ---------------------------------------------------------------------------------------------------------
def threaded_launcher(skip=(), timeout_s=300.0):
    """A replacement for `launch._launch` that runs the interpreter's programs of one launch as
    concurrent threads (program ids thread-local), leaving out the programs in `skip`; fails the test
    when a thread has not finished after `timeout_s` (a hang)."""
    from triton.runtime import interpreter as interp

    class ThreadLocalBuilder(interp.InterpreterBuilder):
        _local = threading.local()

        @property
        def grid_idx(self):
            return getattr(self._local, "idx", None)

        @grid_idx.setter
        def grid_idx(self, v):
            self._local.idx = v

    def run(kernel, grid, *args, **kwargs):
        fn = kernel.rewrite()
        ex = interp.GridExecutor(fn, kernel.arg_names, grid)
        spec = inspect.getfullargspec(fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        args_hst, kwargs_hst = ex._init_args_hst(args, kwargs)
        patch = interp._patch_lang(fn)
        builder = interp.interpreter_builder
        old_cls = builder.__class__
        builder.__class__ = ThreadLocalBuilder
        errors = []
        try:
            call = inspect.getcallargs(fn, *args_hst, **kwargs_hst)
            call = {n: a if n in ex.constexprs else interp._implicit_cvt(a) for n, a in call.items()}
            g = tuple(grid) + (1,) * (3 - len(grid))
            builder.set_grid_dim(*g)

            def program(idx):
                try:
                    builder.set_grid_idx(*idx)
                    fn(**call)
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    errors.append(e)

            threads = [threading.Thread(target=program, args=(idx,), daemon=True)
                       for idx in itertools.product(*map(range, g)) if idx not in skip]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout_s)
            assert not any(th.is_alive() for th in threads), "a program hung at the barrier"
        finally:
            builder.__class__ = old_cls
            patch.restore()
        if errors:
            raise errors[0]
        ex._restore_args_dev(args, args_hst, kwargs, kwargs_hst)

    return run


@pytest.mark.parametrize("S", [2, 3])
def test_barrier_with_concurrent_programs(S, monkeypatch):
    """One persistent launch per pass (in-kernel barrier every step), programs as threads: bitwise the
    numbers of the same plan run a launch per step, and no error."""
    T, B, H, D = 3, 3, 33, 2
    x_proj, w_hh, h0, lens = make(T, B, H, D, torch.float64, lengths=True)
    per_step, g_out, g_hn = run_both(x_proj, w_hh, h0, lens, False, split_config(S, H, persistent=False))
    expected = reference(x_proj, w_hh, h0, lens, False, g_out, g_hn)
    for a, b in zip(per_step, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    monkeypatch.setattr(launch, "_launch", threaded_launcher())
    got, _, _ = run_both(x_proj, w_hh, h0, lens, False,
                         split_config(S, H, persistent=True, max_spins=10**7), g_out, g_hn)
    for a, b in zip(got, per_step):
        assert torch.equal(a, b)
    launch.check_errors(torch.device("cpu"))  # nothing raised


def test_missing_program_ends_in_the_error_not_a_hang(monkeypatch):
    """Program (1, 0, 0) never runs: the other programs of its group give up after max_spins polls,
    poison their outputs from the failed step on with NaN and set the error flag; the other groups are
    unaffected; the next launch (or check_errors) raises RuntimeError naming the cause, once."""
    S, T, B, H, D = 2, 3, 3, 33, 2
    x_proj, w_hh, h0, _ = make(T, B, H, D, torch.float64)
    ref_out, ref_hn = loop_reference(x_proj, w_hh, h0, False)
    monkeypatch.setattr(launch, "_launch", threaded_launcher(skip={(1, 0, 0)}))
    out = torch.full_like(x_proj, 7.0)
    h_n = torch.full_like(h0, 7.0)
    # the bound: short for the group missing a program, long enough that the other group's threads (GIL
    # slices of a few ms) never give up waiting for each other
    cfg = split_config(S, H, persistent=True, max_spins=20_000)
    birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False, config=cfg)
    U = -(-H // S)
    mine = slice(0, U)  # program 0 of direction 0: step 0 is right, every later step NaN
    torch.testing.assert_close(out[0, :, mine], ref_out[0, :, mine])
    assert torch.isnan(out[1:, :, mine]).all() and torch.isnan(h_n[0, :, mine]).all()
    assert (out[:, :, U:H] == 7.0).all()  # the missing program wrote nothing
    torch.testing.assert_close(out[:, :, H:], ref_out[:, :, H:])  # direction 1's group is unaffected
    torch.testing.assert_close(h_n[1], ref_hn[1])
    assert int(launch.error_flag(torch.device("cpu"))[0]) == 1
    monkeypatch.setattr(launch, "_launch", threaded_launcher())
    with pytest.raises(RuntimeError, match="never arrived"):
        birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False, config=cfg)
    launch.check_errors(torch.device("cpu"))  # raised once, then cleared
    birnn_forward(x_proj, w_hh, h0, out, h_n, relu=False, config=replace_spins(cfg))
    torch.testing.assert_close(out, ref_out)


def replace_spins(cfg):
    from dataclasses import replace

    return replace(cfg, max_spins=10**7)


def test_check_errors_raises_after_a_failed_backward(monkeypatch):
    S, T, B, H, D = 3, 2, 2, 7, 1
    x_proj, w_hh, h0, _ = make(T, B, H, D, torch.float64)
    out, _ = loop_reference(x_proj, w_hh, h0, True)
    gp, gh0 = torch.zeros_like(out), torch.zeros_like(h0)
    monkeypatch.setattr(launch, "_launch", threaded_launcher(skip={(2, 0, 0)}))
    birnn_backward(out, torch.randn_like(out), torch.randn_like(h0), w_hh, gp, gh0, relu=True,
                   config=RecurrenceConfig(16, 16, True, split=S, persistent=True, max_spins=50))
    assert torch.isnan(gh0[0, :, :3]).all() and torch.isnan(gp[0]).any()
    with pytest.raises(RuntimeError, match="split recurrence"):
        launch.check_errors("cpu")


def test_plan_uses_the_override_and_device():
    from fused_birnn.kernels.config import DeviceLimits, INTERPRETER_LIMITS

    h100 = DeviceLimits.for_arch(90)
    for H, B, dt in [(256, 32, torch.float32), (512, 8, torch.float16), (1760, 32, torch.float16)]:
        c = select_config(H, B, dt, True, h100)
        assert c.programs_per_group(H) > 1 and c.persistent, c
    assert select_config(50, 5, torch.float64, False, INTERPRETER_LIMITS).programs_per_group(50) == 1
    c = select_config(50, 5, torch.float64, False, INTERPRETER_LIMITS, 3)
    assert c.programs_per_group(50) == 3 and c.units_per_program(50) == 17 and c.block_h == 32
    assert select_config(512, 8, torch.float16, False, h100, 4).programs_per_group(512) == 4
