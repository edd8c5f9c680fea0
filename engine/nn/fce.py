"""Full Context Embeddings (Vinyals et al., 2016, section 2.1.2 and appendix A).

- g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): a bidirectional LSTM runs over the
  support embeddings g'(x_i) (in the support set's order), and its forward and
  backward states are added to the skip connection.
- f(x, S) = attLSTM(f'(x), g(S), K): for k = 1..K,
      ĥ_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
      h_k      = ĥ_k + f'(x)
      r_{k-1}  = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)
  and f(x, S) = h_K.

Where this departs from the paper (which leaves these open), the choices are:
- the initial state is h_0 = f'(x), c_0 = 0, so that K = 0 gives f(x, S) = f'(x);
- the read-out r attends over the L2-normalised support embeddings, the vectors
  a cosine memory stores, so that the read can be served from ``engine.Memory``
  (with top-k retrieval) as well as computed in-batch.
The LSTM of the attention step takes the concatenated state [h, r] (2d) and
outputs d, as in the paper; a stock ``nn.LSTMCell`` cannot, so the cell's gates
are written out below with ordinary torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SupportBiLSTM(nn.Module):
    """g(x_i, S): bidirectional LSTM over the support embeddings plus the skip connection.

    Args:
        dim: embedding dimension d (the LSTM's hidden size, so states add to g').
    """

    def __init__(self, dim: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.dim = dim

    def forward(self, g_prime: torch.Tensor) -> torch.Tensor:
        """(n, d) support embeddings g'(x_i) -> (n, d) full-context g(x_i, S)."""
        out, _ = self.lstm(g_prime.unsqueeze(0))
        forward_state, backward_state = out[0, :, : self.dim], out[0, :, self.dim :]
        return forward_state + backward_state + g_prime


class AttentionLSTM(nn.Module):
    """f(x, S): an LSTM run for K read steps over the support set.

    Args:
        dim: embedding dimension d.
        steps: K, the number of read steps (0 returns f'(x) unchanged).
    """

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim, self.steps = dim, steps
        self.input_gates = nn.Linear(dim, 4 * dim)
        self.state_gates = nn.Linear(2 * dim, 4 * dim, bias=False)

    def read(self, h: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """r = sum_i softmax_i(h^T g_i) g_i over unit-norm support vectors ``support`` (m, d)."""
        return torch.softmax(h @ support.T, dim=1) @ support

    def forward(self, f_prime: torch.Tensor, support: torch.Tensor, reader=None) -> torch.Tensor:
        """Refine query embeddings by K attention steps over the support set.

        Args:
            f_prime: (n, d) query embeddings f'(x).
            support: (m, d) full-context support embeddings g(S) (normalised inside).
            reader: optional callable h -> r replacing the in-batch read (the memory-backed
                path passes a top-k read over ``engine.Memory``).

        Returns:
            (n, d) f(x, S).
        """
        if reader is None:
            unit = F.normalize(support, dim=1)
            reader = lambda h: self.read(h, unit)  # noqa: E731

        h = f_prime
        c = torch.zeros_like(f_prime)
        for _ in range(self.steps):
            r = reader(h)
            gates = self.input_gates(f_prime) + self.state_gates(torch.cat([h, r], dim=1))
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c) + f_prime
        return h
