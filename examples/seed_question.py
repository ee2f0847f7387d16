"""Split a 4-layer bidirectional nn.RNN into unidirectional nn.RNNs, the wrong and the right way.

Configuration of the forum question: nn.RNN(25, 50, 4, batch_first=True, bidirectional=True) on an
input of shape (15, 5, 25), i.e. B = 15 sequences of T = 5 steps, with h0 of shape (8, 15, 50).
Prints one PASS line per check and fails with an AssertionError on any mismatch.
"""

import torch
from torch import nn

from fused_birnn import RNN
from fused_birnn.reference import rnn_reference

torch.manual_seed(0)
L, H = 4, 50
rnn_bidir = nn.RNN(25, H, L, batch_first=True, bidirectional=True)
input = torch.randn(15, 5, 25)
hidden_forward = torch.randn(L, 15, H)
hidden_backward = torch.randn(L, 15, H)
# h0[2*l] is layer l's forward state, h0[2*l+1] its reverse state: [f0, b0, f1, b1, ...].
h0 = torch.stack((hidden_forward, hidden_backward), dim=1).reshape(2 * L, 15, H)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    diff = max_diff(a, b)
    assert diff <= tol, f"FAIL: {name}: max |diff| = {diff:.3g} > {tol:g}"
    print(f"PASS: {name} (max |diff| = {diff:.1e})")


def single_direction(layer: int, reverse: bool) -> nn.RNN:
    """A 1-layer unidirectional nn.RNN holding the weights of one direction of one layer."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih = getattr(rnn_bidir, "weight_ih" + suffix)
    rnn = nn.RNN(w_ih.shape[1], H, 1, batch_first=True)
    rnn.load_state_dict(
        {name + "_l0": getattr(rnn_bidir, name + suffix)
         for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    )
    return rnn


forward_rnns = [single_direction(layer, reverse=False) for layer in range(L)]
backward_rnns = [single_direction(layer, reverse=True) for layer in range(L)]

with torch.no_grad():
    out_bidir, h_n_bidir = rnn_bidir(input, h0)

    # 0. The post's h0 interleaving loop and its time-reversal loop are not the problem.
    hidden_bidir_init = torch.cat((hidden_forward[:1], hidden_backward[:1]), 0)
    for hid_for, hid_back in zip(hidden_forward[1:], hidden_backward[1:]):
        hidden_bidir_init = torch.cat((hidden_bidir_init, hid_for[None], hid_back[None]), 0)
    check("the post's h0 interleaving equals [f0, b0, f1, b1, ...]", hidden_bidir_init, h0, tol=0)
    inverse_input = input[:, -1:]
    for i, _ in enumerate(input[:, :-1]):  # iterates over the batch (B = 15 >= T - 1), see the doc
        inverse_input = torch.cat((inverse_input, input[:, -i - 2 : -i - 1]), 1)
    check("the post's inverse_input equals input.flip(1)", inverse_input, input.flip(1), tol=0)

    # 1. The post's decomposition: the reverse RNN reads input.flip(1), but its output (in reversed
    #    time order) is concatenated as is, and layer 2's reverse RNN reads its input un-reversed.
    out_f1, h_f1 = forward_rnns[0](input, hidden_forward[0:1])
    out_b1, h_b1 = backward_rnns[0](input.flip(1), hidden_backward[0:1])
    naive_in2 = torch.cat((out_f1, out_b1), dim=-1)
    _, h_f2 = forward_rnns[1](naive_in2, hidden_forward[1:2])
    _, h_b2 = backward_rnns[1](naive_in2, hidden_backward[1:2])
    check("naive layer 1 forward h_n", h_f1[0], h_n_bidir[0])
    check("naive layer 1 reverse h_n", h_b1[0], h_n_bidir[1])
    naive_diff = max(max_diff(h_f2[0], h_n_bidir[2]), max_diff(h_b2[0], h_n_bidir[3]))
    assert naive_diff > 1e-2, "the naive decomposition was expected to diverge at layer 2"
    print(f"PASS: naive decomposition diverges at layer 2, as in the post "
          f"(max |diff| = {naive_diff:.2f})")

    # Flipping layer 1's reverse output back fixes layer 2's forward direction; its reverse
    # direction still reads the sequence in the wrong order.
    fixed_in2 = torch.cat((out_f1, out_b1.flip(1)), dim=-1)
    _, h_f2 = forward_rnns[1](fixed_in2, hidden_forward[1:2])
    _, h_b2 = backward_rnns[1](fixed_in2, hidden_backward[1:2])
    check("flip-back fixes layer 2 forward h_n", h_f2[0], h_n_bidir[2])
    assert max_diff(h_b2[0], h_n_bidir[3]) > 1e-2, "layer 2 reverse must read its input reversed"
    print("PASS: layer 2 reverse still diverges until it also reads its input reversed")

    # 2. The correct flow: flip the reverse direction's input AND flip its output back to time
    #    order; both directions of the next layer read the per-time-step concatenation [fwd, rev].
    x = input
    h_n = []
    for layer in range(L):
        out_f, h_f = forward_rnns[layer](x, h0[2 * layer : 2 * layer + 1])
        out_b, h_b = backward_rnns[layer](x.flip(1), h0[2 * layer + 1 : 2 * layer + 2])
        out_b = out_b.flip(1)  # out_b[:, t] is now the reverse state right after reading x[:, t]
        x = torch.cat((out_f, out_b), dim=-1)
        h_n += [h_f, h_b]
    check("corrected decomposition output", x, out_bidir)
    check("corrected decomposition h_n", torch.cat(h_n), h_n_bidir)

    # 3. h_n[2*l+1] is the reverse state after reading t = 0; h_n[2*l] the forward one after T-1.
    check("h_n[-1] (top reverse) == output[:, 0, H:]", h_n_bidir[-1], out_bidir[:, 0, H:])
    check("h_n[-2] (top forward) == output[:, -1, :H]", h_n_bidir[-2], out_bidir[:, -1, :H])

    # 4. h0[1] enters layer 0's reverse direction at its first step, the one that reads x[:, T-1].
    layer0 = nn.RNN(25, H, 1, batch_first=True, bidirectional=True)
    layer0.load_state_dict({k: v for k, v in rnn_bidir.state_dict().items() if "_l0" in k})
    out_layer0, _ = layer0(input, h0[0:2])
    p = rnn_bidir
    first_reverse_step = torch.tanh(
        input[:, -1] @ p.weight_ih_l0_reverse.T + p.bias_ih_l0_reverse
        + h0[1] @ p.weight_hh_l0_reverse.T + p.bias_hh_l0_reverse
    )
    check("h0[1] is applied before the reverse direction reads x[:, T-1]",
          first_reverse_step, out_layer0[:, -1, H:])

    # 5. The readable reference and the fused module compute the same thing.
    params = dict(rnn_bidir.named_parameters())
    out_ref, h_n_ref = rnn_reference(input, h0, params, num_layers=L, batch_first=True,
                                     bidirectional=True)
    check("fused_birnn.reference output", out_ref, out_bidir, tol=1e-5)
    check("fused_birnn.reference h_n", h_n_ref, h_n_bidir, tol=1e-5)

fused = RNN(25, H, L, batch_first=True, bidirectional=True)
fused.load_state_dict(rnn_bidir.state_dict())
with torch.no_grad():
    out_fused, h_n_fused = fused(input, h0)
check("fused_birnn.RNN output", out_fused, out_bidir, tol=1e-5)
check("fused_birnn.RNN h_n", h_n_fused, h_n_bidir, tol=1e-5)
