"""fused_birnn: Triton kernels for multi-layer bidirectional RNNs, a drop-in `torch.nn.RNN`.

`fused_birnn.RNN` runs each layer's forward and reverse recurrence in one Triton launch writing one
`[T, B, 2H]` buffer; `fused_birnn.reference` spells out the computation in plain PyTorch.
"""

from .convert import convert, to_torch
from .rnn import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "convert", "to_torch"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `fused_birnn.export` (ONNX export) imports onnxscript, an optional extra: only on first use
    if name == "export":
        import importlib

        return importlib.import_module(".export", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
