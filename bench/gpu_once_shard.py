"""pytest plugin of `bench/gpu_once.py`: one of N pytest processes runs its share of the selected tests, and
every test's outcome is written down the moment it is known.

Loaded with `-p gpu_once_shard` (bench/ on PYTHONPATH) and configured by environment:

* `FUSED_BIRNN_SHARD=i/N`: keep the i-th of N disjoint shares of the tests left after `-m`/`-k`. Every
  process collects the same tests in the same order, so each computes the same split: longest-first
  (estimated weights, `weight`) onto the least-loaded share, ties in collection order. The N processes
  compile their kernels in parallel, on N cores.
* `FUSED_BIRNN_SHARD_OUT=PREFIX`: write `PREFIX.ids` (this share's test ids, at collection) and append one
  JSON line per test phase to `PREFIX.jsonl` (`start`, then `setup`/`call`/`teardown` with outcome,
  duration and, for a failure or skip, the first lines of its report), flushed at once: a process stopped
  by the budget, even by SIGKILL, leaves every finished test's result behind, and the test it was running
  is the one that started and never finished.
"""

from __future__ import annotations

import json
import os
import re

import pytest

# Estimated relative cost of a CUDA test (compiles dominate: each distinct kernel specialisation costs
# 0.4-1.1 s of CPU on its first launch, measured on CPU for sm_90); unmeasured on a GPU, only used to
# balance the shares. First matching pattern wins.
WEIGHTS = (
    (r"compile|cudagraphs", 8.0),  # torch.compile / Inductor: tens of seconds of compilation
    (r"graph_captures", 3.0),
    (r"H1024|H1760|H2048|streamed_large", 3.0),
    (r"split|S2|S3", 2.0),
    (r"module_db|cpu_gpu_parity", 0.5),
)


def weight(nodeid: str) -> float:
    for pattern, w in WEIGHTS:
        if re.search(pattern, nodeid):
            return w
    return 1.0


def assign(nodeids: list[str], shards: int) -> list[int]:
    """The share (0..shards-1) of each test: longest first onto the least-loaded share."""
    load = [0.0] * shards
    owner = [0] * len(nodeids)
    for i in sorted(range(len(nodeids)), key=lambda i: (-weight(nodeids[i]), i)):
        s = min(range(shards), key=lambda k: (load[k], k))
        owner[i] = s
        load[s] += weight(nodeids[i])
    return owner


def _shard() -> tuple[int, int] | None:
    spec = os.environ.get("FUSED_BIRNN_SHARD")
    if not spec:
        return None
    i, n = (int(v) for v in spec.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"FUSED_BIRNN_SHARD={spec}: expected i/N with 0 <= i < N")
    return i, n


class _Recorder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
        self.log = open(prefix + ".jsonl", "a", buffering=1)

    def write(self, **record) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()


_recorder: _Recorder | None = None


def pytest_configure(config):
    global _recorder
    prefix = os.environ.get("FUSED_BIRNN_SHARD_OUT")
    if prefix:
        _recorder = _Recorder(prefix)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    shard = _shard()
    if shard is not None:
        i, n = shard
        owner = assign([item.nodeid for item in items], n)
        keep = [item for item, o in zip(items, owner) if o == i]
        dropped = [item for item, o in zip(items, owner) if o != i]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    if _recorder is not None:
        with open(_recorder.prefix + ".ids", "w") as f:
            f.writelines(item.nodeid + "\n" for item in items)


def pytest_runtest_logstart(nodeid, location):
    if _recorder is not None:
        _recorder.write(nodeid=nodeid, when="start")


def pytest_runtest_logreport(report):
    if _recorder is None:
        return
    message = ""
    if report.failed or report.skipped:
        text = report.longreprtext or ""
        if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
            text = str(report.longrepr[2])
        message = "\n".join(text.strip().splitlines()[-6:])[:800]
    _recorder.write(nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                    duration=round(report.duration, 3), message=message)
