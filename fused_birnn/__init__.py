"""fused_birnn: Triton kernels for multi-layer bidirectional RNNs, a drop-in `torch.nn.RNN`.

`fused_birnn.RNN` runs each layer's forward and reverse recurrence in one Triton launch writing one
`[T, B, 2H]` buffer; `fused_birnn.reference` spells out the computation in plain PyTorch.
"""

from .convert import convert, to_torch
from .rnn import RNN

__all__ = ["RNN", "convert", "to_torch"]
__version__ = "0.1.0"
