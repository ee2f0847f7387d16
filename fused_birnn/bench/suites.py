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

LSTM and GRU suites (`fused_birnn.LSTM` / `fused_birnn.GRU` against `nn.LSTM` / `nn.GRU`), the
bidirectional workloads of `shared/research/lstm-gru.md` section 3 (W1-W9), at their real sizes on a GPU
and at a small size on a CPU (same cell, layers and packing; H, B, T shrunk):

* `pyannote`: pyannote segmentation (PyanNet): LSTM 4 x 128, I=60, B=32, T=589 (10 s chunk), batch_first.
* `tacotron2`: Tacotron 2 encoder: LSTM 1 x 256, I=512, B=64, T=150 symbols, batch_first, packed
  (lengths in [T/2, T]).
* `openunmix`: Open-Unmix: LSTM 3 x 256, I=512, B=16, T=259 (6 s at 44.1 kHz, hop 1024), time-major.
* `espnet`: ESPnet2's `RNNEncoder` default, four separate single-layer BiLSTMs H=320, each run packed,
  with a Linear (2H -> 320) and time subsampling (2, 2, 1, 1) between them: layer 0 reads 80 fbank
  features at T=800 (WSJ's `maxlen-in`), layer 1 320 at T=400, layers 2 and 3 320 at T=200 (listed once:
  the encoder's time is layer 0 + layer 1 + 2 x layer 2). B=30.
* `deepspeech`: deepspeech.pytorch: LSTM 5 x 1024, I=1312 (32 conv channels x 41 frequencies), B=32,
  T=300. There each layer is its own module and the two directions are summed, so its upper layers read
  1024 features where this stack's read 2048.
* `deepspeech2`: DeepSpeech2 as in openspeech: GRU 5 x 1024, B=32, T=300; I=1312 as for `deepspeech`
  (the conv front end's width; openspeech's own depends on its feature count).
* `nemo`: NeMo LSTM-CTC large: LSTM 8 x 2048 with proj_size=320 per direction, I=640, B=16, T=418
  (16.7 s, 10 ms frames, stacking x4), batch_first. NeMo stacks 8 single-layer modules with LayerNorm
  between; the shapes are this 8-layer stack's.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
GPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_DTYPES = ("fp32",)


CELLS = ("RNN", "LSTM", "GRU")  # the torch.nn (and fused_birnn) class of each
GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}  # gate blocks per hidden unit: rows of weight_ih / weight_hh per H


@dataclass(frozen=True)
class Config:
    """One benchmark case: `nn.<cell>(input_size, hidden_size, num_layers, batch_first=batch_first,
    bidirectional=True)` (`nonlinearity` for the RNN, `proj_size` for the LSTM) on an input of `batch`
    sequences of `seq_len` steps.

    Attributes:
        cell: "RNN" (Elman), "LSTM" or "GRU".
        proj_size: LSTM only: the projected state width P (0: none). h0 / h_n and each direction's output
            are P wide, c0 / c_n stay `hidden_size` wide.
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
    cell: str = "RNN"
    proj_size: int = 0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.proj_size and self.cell != "LSTM":
            raise ValueError(f"proj_size is only supported for LSTM, got cell={self.cell!r}")
        if self.cell != "RNN" and self.nonlinearity != "tanh":
            raise ValueError(f"nonlinearity is only an RNN argument, got {self.nonlinearity!r} for {self.cell}")
        if not 0 <= self.proj_size < self.hidden_size:
            raise ValueError(f"proj_size must lie in [0, hidden_size), got {self.proj_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def out_size(self) -> int:
        """Width of h0 / h_n and of each direction's output: proj_size if set, else hidden_size."""
        return self.proj_size or self.hidden_size

    @property
    def label(self) -> str:
        act = "" if self.nonlinearity == "tanh" else " relu"
        cell = "" if self.cell == "RNN" else f"{self.cell} "
        proj = f" P{self.proj_size}" if self.proj_size else ""
        return (f"{cell}L{self.num_layers} I{self.input_size} H{self.hidden_size}{proj} B{self.batch} "
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
        """Multiply-adds x 2 of one forward pass: per layer and direction ``2*T*B*G*H*(I_l + P)``
        plus, with a projection, ``2*T*B*H*P``; G = 1 (RNN), 4 (LSTM), 3 (GRU) gate blocks, P =
        `out_size`, ``I_l = input_size`` for layer 0 and ``2*P`` above (both directions feed the next
        layer). For the RNN that is ``2*T*B*(I_l*H + H*H)``. The backward pass does twice that (input
        and weight gradients), so forward+backward is counted as ``3 x`` forward. Pointwise work
        (activations, biases, gate products) is not counted."""
        T, B, H, P, G = self.seq_len, self.batch, self.hidden_size, self.out_size, GATES[self.cell]
        total = 0
        for layer in range(self.num_layers):
            i_l = self.input_size if layer == 0 else 2 * P
            per_dir = G * H * (i_l + P) + (H * P if self.proj_size else 0)
            total += 2 * 2 * T * B * per_dir  # 2 directions
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


# ------------------------------------------------------------------------------------ LSTM and GRU
# Real sizes (GPU) from shared/research/lstm-gru.md section 3, and a CPU size of the same structure. With
# `quick`: the GPU shape at a quarter of T (at least 16 steps); on a CPU, the CPU shape at half of T.
def _shrink(configs: list[Config], device: str, quick: bool) -> list[Config]:
    if not quick:
        return configs
    div = 4 if device == "cuda" else 2
    return [replace(c, seq_len=max(16 if device == "cuda" else 8, c.seq_len // div)) for c in configs]


def _pyannote(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(4, 60, 32, 8, 64, batch_first=True, cell="LSTM")], device, quick)
    return _shrink([Config(4, 60, 128, 32, 589, batch_first=True, cell="LSTM")], device, quick)


def _tacotron2(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(1, 128, 64, 16, 50, batch_first=True, packed=True, cell="LSTM")], device, quick)
    return _shrink([Config(1, 512, 256, 64, 150, batch_first=True, packed=True, cell="LSTM")], device, quick)


def _openunmix(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(3, 128, 64, 4, 64, cell="LSTM")], device, quick)
    return _shrink([Config(3, 512, 256, 16, 259, cell="LSTM")], device, quick)


def _espnet(device: str, quick: bool) -> list[Config]:
    # layers 0, 1 and (2 = 3): (input features, time steps) after subsampling (2, 2, 1, 1)
    if device == "cpu":
        h, b, layers = 64, 8, [(40, 64), (64, 32)]
    else:
        h, b, layers = 320, 30, [(80, 800), (320, 400), (320, 200)]
    if quick:
        layers = layers[:1]
    return _shrink([Config(1, i, h, b, t, packed=True, cell="LSTM") for i, t in layers], device, quick)


def _deepspeech(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(5, 128, 64, 4, 40, cell="LSTM")], device, quick)
    return _shrink([Config(5, 1312, 1024, 32, 300, cell="LSTM")], device, quick)


def _deepspeech2(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(5, 128, 64, 4, 40, cell="GRU")], device, quick)
    return _shrink([Config(5, 1312, 1024, 32, 300, cell="GRU")], device, quick)


def _nemo(device: str, quick: bool) -> list[Config]:
    if device == "cpu":
        return _shrink([Config(8, 64, 128, 4, 40, batch_first=True, cell="LSTM", proj_size=32)], device, quick)
    return _shrink([Config(8, 640, 2048, 16, 418, batch_first=True, cell="LSTM", proj_size=320)], device, quick)


SUITES = {
    "seed": _seed,
    "deepbench": _deepbench,
    "speech": _speech,
    "tagger": _tagger,
    "latency": _latency,
    "scaling": _scaling,
    "tiny": _tiny,
    "pyannote": _pyannote,
    "tacotron2": _tacotron2,
    "openunmix": _openunmix,
    "espnet": _espnet,
    "deepspeech": _deepspeech,
    "deepspeech2": _deepspeech2,
    "nemo": _nemo,
}
RNN_SUITES = ("seed", "tagger", "latency", "scaling", "deepbench", "speech")
LSTM_GRU_SUITES = ("pyannote", "tacotron2", "openunmix", "espnet", "deepspeech", "deepspeech2", "nemo")
ALL = RNN_SUITES + LSTM_GRU_SUITES  # what `--suite all` runs
GROUPS = {"all": ALL, "rnn": RNN_SUITES, "lstm-gru": LSTM_GRU_SUITES}  # suite names that stand for several


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
