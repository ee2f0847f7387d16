"""fused_birnn.RNN, LSTM and GRU under DistributedDataParallel (CPU, gloo, 2 spawned processes): DDP's
broadcast of rank 0's weights, its averaged gradients and a few SGD steps match nn's class under DDP on
the same data."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_birnn

WORLD_SIZE = 2
TIMEOUT_S = 90  # the whole run takes a few seconds; this only bounds a hang
# (name, cell, constructor kwargs, training steps); every config is run by both modules in one spawn
CONFIGS = [
    ("uni", "RNN", dict(input_size=3, hidden_size=5, num_layers=1), 1),
    ("bi2", "RNN", dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True), 3),
    ("lstm-proj", "LSTM", dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2), 2),
    ("gru", "GRU", dict(input_size=3, hidden_size=4, num_layers=1, bidirectional=True), 2),
]
CLASSES = {"RNN": (torch.nn.RNN, fused_birnn.RNN), "LSTM": (torch.nn.LSTM, fused_birnn.LSTM),
           "GRU": (torch.nn.GRU, fused_birnn.GRU)}


def batch(cfg, rank, step):
    """Rank- and step-specific data: (x, hx (LSTM: (h0, c0)), weight on the output)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    D = 2 if cfg.get("bidirectional") else 1
    T, B = 5, 3
    P = cfg.get("proj_size") or cfg["hidden_size"]
    shape = (B, T) if cfg.get("batch_first") else (T, B)
    x = torch.randn(*shape, cfg["input_size"], generator=g, dtype=torch.float64)
    hx = torch.randn(D * cfg["num_layers"], B, P, generator=g, dtype=torch.float64)
    if "proj_size" in cfg:  # the LSTM configs
        hx = (hx, torch.randn(D * cfg["num_layers"], B, cfg["hidden_size"], generator=g, dtype=torch.float64))
    w = torch.randn(*shape, D * P, generator=g, dtype=torch.float64)
    return x, hx, w


def loss_of(module, cfg, rank, step):
    x, hx, w = batch(cfg, rank, step)
    out, h_n = module(x, hx)
    return (out * w).sum() + sum(h.square().sum() for h in (h_n if isinstance(h_n, tuple) else (h_n,)))


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for name, cell, cfg, steps in CONFIGS:
            ref_cls, fused_cls = CLASSES[cell]
            for kind, cls, extra in [("torch", ref_cls, {}), ("fused", fused_cls, {"backend": "torch"}),
                                     ("fused_bucket_view", fused_cls, {"backend": "torch"})]:
                torch.manual_seed(rank)  # different weights per rank: DDP must broadcast rank 0's
                module = cls(**cfg, dtype=torch.float64, **extra)
                ddp = DDP(module, gradient_as_bucket_view=kind == "fused_bucket_view")
                record = {"init": {n: p.detach().clone() for n, p in module.named_parameters()}}
                opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
                for step in range(steps):
                    opt.zero_grad()
                    loss_of(ddp, cfg, rank, step).backward()
                    if step == 0:
                        record["grad"] = {n: p.grad.clone() for n, p in module.named_parameters()}
                    opt.step()
                record["final"] = {n: p.detach().clone() for n, p in module.named_parameters()}
                results[(name, kind)] = record
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_first_grads(cell, cfg, init):
    """DDP's gradient: the mean over ranks of each rank's local gradient, for rank 0's weights."""
    module = CLASSES[cell][0](**cfg, dtype=torch.float64)
    module.load_state_dict(init)
    grads = []
    for rank in range(WORLD_SIZE):
        module.zero_grad()
        loss_of(module, cfg, rank, 0).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    return {n: sum(g[n] for g in grads) / WORLD_SIZE for n in grads[0]}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("name, cell, cfg, steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_ddp_matches_nn(ddp_results, name, cell, cfg, steps):
    rank0, rank1 = ddp_results
    ref = rank0[(name, "torch")]
    torch.manual_seed(0)  # rank 0's initial weights, as the workers drew them
    init = CLASSES[cell][0](**cfg, dtype=torch.float64).state_dict()
    expected = expected_first_grads(cell, cfg, init)
    for kind in ("torch", "fused", "fused_bucket_view"):
        for rank, results in enumerate(ddp_results):
            record = results[(name, kind)]
            for n in init:
                where = f"{name} {kind} rank {rank} {n}"
                assert torch.equal(record["init"][n], init[n]), f"{where}: not rank 0's weights after DDP()"
                assert_close(record["grad"][n], expected[n], torch.float64, f"{where} grad")
                assert_close(record["final"][n], ref["final"][n], torch.float64, f"{where} after {steps} steps")
                assert torch.equal(record["final"][n], rank0[(name, kind)]["final"][n]), f"{where}: ranks differ"
    assert not torch.equal(ref["final"]["weight_hh_l0"], init["weight_hh_l0"])  # training moved the weights
