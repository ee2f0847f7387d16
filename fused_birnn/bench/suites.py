"""Benchmark configurations: named suites, sized for a GPU or (same names) for a CPU.

A suite is a list of `Config`s. GPU suites run each shape in fp32, fp16 and bf16; CPU suites run fp32 only
at shapes small enough that `seed` + `tagger` take well under two minutes on a laptop-class CPU.
`quick=True` shrinks every suite to a couple of configurations for smoke runs.

Sources of the shapes:

* `seed`: the question that started the project, ``nn.RNN(25, 50, 4, batch_first=True,
  bidirectional=True)`` on an input ``(15, 5, 25)`` with ``h0 (8, 15, 50)`` (B=15, T=5).
* `deepbench`: Baidu DeepBench's vanilla-RNN training shapes (hidden 1760 and 2560, batch 16..128,
  T=50, one layer, input size = hidden), run bidirectionally.
* `speech`: DeepSpeech2-like acoustic models: 5-7 bidirectional ReLU layers, H 800-1760, T 300-700,
  B 32 (DS2 feeds the RNN stack a convolution's output; here the input size equals H); each shape
  padded and as a PackedSequence with lengths between T/2 and T (cuDNN's packed path on a GPU).
* `tagger`: a sequence tagger, 2 tanh layers, H 256, T 64, B 32, I 100.
* `latency`: small batches (1-8), H 128-512, long sequences (T 100-1000): step latency dominates.
* `scaling`: one-at-a-time sweeps of T, B and H around H=256, B=32, T=128 (one layer, I = H).
* `tiny`: two minute configurations for the test suite (not part of `all`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
GPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_DTYPES = ("fp32",)


@dataclass(frozen=True)
class Config:
    """One benchmark case: an `nn.RNN(input_size, hidden_size, num_layers, nonlinearity,
    batch_first=batch_first, bidirectional=True)` on an input of `batch` sequences of `seq_len` steps.

    Attributes:
        sweep: which variable this case sweeps in its suite ("T", "B", "H" or ""), for the plots.
        packed: feed a `PackedSequence` (unsorted, lengths from `lengths()`) instead of a padded batch.
    """

    num_layers: int
    input_size: int
    hidden_size: int
    batch: int
    seq_len: int
    dtype: str = "fp32"
    nonlinearity: str = "tanh"
    batch_first: bool = False
    bias: bool = True
    sweep: str = ""
    packed: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        act = "" if self.nonlinearity == "tanh" else " relu"
        return (f"L{self.num_layers} I{self.input_size} H{self.hidden_size} B{self.batch} "
                f"T{self.seq_len} {self.dtype}{act}{' packed' if self.packed else ''}")

    def lengths(self) -> torch.Tensor:
        """Speech-like valid lengths of a packed configuration: drawn between T/2 and T (one of them T),
        the same for every run of this shape."""
        gen = torch.Generator().manual_seed(self.batch * 1_000_003 + self.seq_len)
        lengths = torch.randint((self.seq_len + 1) // 2, self.seq_len + 1, (self.batch,), generator=gen)
        lengths[0] = self.seq_len
        return lengths

    def to_dict(self) -> dict:
        return asdict(self)

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of one forward pass: per layer and direction ``2*T*B*(I_l*H + H*H)``,
        with ``I_l = input_size`` for layer 0 and ``2*H`` above (both directions feed the next layer).
        The backward pass does twice that (input and weight gradients), so forward+backward is
        counted as ``3 x`` forward. Pointwise work (activation, bias) is not counted."""
        T, B, H = self.seq_len, self.batch, self.hidden_size
        total = 0
        for layer in range(self.num_layers):
            i_l = self.input_size if layer == 0 else 2 * H
            total += 2 * 2 * T * B * (i_l * H + H * H)  # 2 directions
        return total


def _with_dtypes(shapes: list[Config], dtypes: tuple[str, ...]) -> list[Config]:
    return [replace(c, dtype=d) for d in dtypes for c in shapes]


def _seed(device: str, quick: bool) -> list[Config]:
    return [Config(4, 25, 50, 15, 5, batch_first=True)]


def _tagger(device: str, quick: bool) -> list[Config]:
    if quick:
        return [Config(2, 100, 256, 32, 16 if device == "cpu" else 64)]
    return [Config(2, 100, 256, 32, 64)]


def _deepbench(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        hb = [(128, 8), (256, 16)] if not quick else [(128, 8)]
        return [Config(1, h, h, b, 50 if not quick else 10) for h, b in hb]
    if quick:
        return [Config(1, 1760, 1760, 32, 50)]
    return [Config(1, h, h, b, 50) for h in (1760, 2560) for b in (16, 32, 64, 128)]


def _speech(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        shapes = [(5, 64, 50), (7, 128, 100)] if not quick else [(5, 32, 10)]
        return [Config(layers, h, h, 8, t, nonlinearity="relu", packed=packed)
                for layers, h, t in shapes for packed in (False, True)]
    if quick:
        return [Config(5, 800, 800, 32, 100, nonlinearity="relu", packed=packed) for packed in (False, True)]
    shapes = [(5, 800, 300), (6, 1280, 500), (7, 1760, 700)]
    # each shape padded and packed (utterances of different lengths, as a CTC model sees them)
    return [Config(layers, h, h, 32, t, nonlinearity="relu", packed=packed)
            for layers, h, t in shapes for packed in (False, True)]


def _latency(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        grid = [(1, 64, 100), (8, 128, 200)] if not quick else [(1, 32, 20)]
    elif quick:
        grid = [(1, 128, 100), (8, 512, 1000)]
    else:
        grid = list(itertools.product((1, 8), (128, 256, 512), (100, 1000)))
    return [Config(1, h, h, b, t) for b, h, t in grid]


def _scaling(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        base = dict(H=64, B=8, T=32)
        sweeps = {"T": (8, 32, 128), "B": (1, 8, 32), "H": (32, 64, 128)}
    else:
        base = dict(H=256, B=32, T=128)
        sweeps = {"T": (32, 64, 128, 256, 512, 1024), "B": (1, 8, 32, 128, 512),
                  "H": (64, 128, 256, 512, 1024)}
    if quick:
        sweeps = {k: v[:2] for k, v in sweeps.items()}
    out: list[Config] = []
    seen: set[tuple] = set()
    for var, values in sweeps.items():
        for v in values:
            p = dict(base, **{var: v})
            key = (p["H"], p["B"], p["T"])
            if key in seen:  # the base point belongs to every sweep; listed once, tagged by the first
                continue
            seen.add(key)
            out.append(Config(1, p["H"], p["H"], p["B"], p["T"], sweep=var))
    return out


def _tiny(device: str, quick: bool) -> list[Config]:
    return [Config(2, 3, 4, 2, 3), Config(2, 3, 4, 2, 5), Config(2, 3, 4, 3, 5, packed=True)]


SUITES = {
    "seed": _seed,
    "deepbench": _deepbench,
    "speech": _speech,
    "tagger": _tagger,
    "latency": _latency,
    "scaling": _scaling,
    "tiny": _tiny,
}
ALL = ("seed", "tagger", "latency", "scaling", "deepbench", "speech")  # what `--suite all` runs


def get_suite(name: str, device: str, *, quick: bool = False, dtypes: tuple[str, ...] | None = None) -> list[Config]:
    """The configurations of suite `name` on `device` ("cuda" or "cpu"), in each of `dtypes`
    (default: fp32, fp16, bf16 on CUDA; fp32 on CPU)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {tuple(SUITES)} or 'all'")
    default = GPU_DTYPES if device == "cuda" else CPU_DTYPES
    if quick and device == "cuda" and dtypes is None:
        default = ("fp32", "fp16")
    chosen = tuple(dtypes) if dtypes else default
    for d in chosen:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; expected one of {tuple(DTYPES)}")
    return _with_dtypes(SUITES[name](device, quick), chosen)
