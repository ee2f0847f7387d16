"""The seed forward from an installed wheel (CI, `.ci/install_check.sh`): run from a folder outside the
checkout with `python -I`, so that only the installed distribution can be imported (NOTES-triton 9).

    python -I install_check.py torch auto            # TRITON_INTERPRET unset
    TRITON_INTERPRET=1 python -I install_check.py triton torch auto

Each backend's `fused_birnn.RNN(25, 50, 4, batch_first=True, bidirectional=True)` must match `nn.RNN`
with the same weights on x (15, 5, 25), h0 (8, 15, 50), forward and gradients.
"""

import os
import sys
import sysconfig
from pathlib import Path

import torch

import fused_birnn
from fused_birnn.functional import INTERPRETER

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(fused_birnn.__file__).resolve()
assert site in where.parents, f"fused_birnn imported from {where}, not from the installed wheel in {site}"
import fused_birnn.kernels  # noqa: E402,F401 - the package-dir mapping made it into the wheel

want_interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
assert INTERPRETER == want_interp, (INTERPRETER, os.environ.get("TRITON_INTERPRET"))

torch.manual_seed(0)
ref = torch.nn.RNN(25, 50, 4, batch_first=True, bidirectional=True)
x, h0 = torch.randn(15, 5, 25), torch.randn(8, 15, 50)
ref_out, ref_hn = ref(x, h0)
ref_grads = torch.autograd.grad((ref_out.sum() + ref_hn.sum()), list(ref.parameters()))
for backend in sys.argv[1:]:
    rnn = fused_birnn.RNN(25, 50, 4, batch_first=True, bidirectional=True, backend=backend)
    rnn.load_state_dict(ref.state_dict())
    out, h_n = rnn(x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_hn)
    grads = torch.autograd.grad((out.sum() + h_n.sum()), list(rnn.parameters()))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    print(f"seed forward+backward, backend={backend!r}, TRITON_INTERPRET={int(want_interp)}: matches nn.RNN")
if not want_interp:  # the kernels need a GPU or the interpreter: a clear error, not a wrong number
    try:
        fused_birnn.RNN(25, 50, 4, batch_first=True, bidirectional=True, backend="triton")(x, h0)
    except (RuntimeError, ValueError) as e:
        print(f"backend='triton' without a GPU or the interpreter raises {type(e).__name__}: {str(e)[:100]}")
    else:
        raise AssertionError("backend='triton' ran on a CPU without the interpreter")
