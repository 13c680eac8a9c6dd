"""A learned softmax-weighted mix of the pretrained encoder's hidden states (ablation, paper section 6:
which layer of BERT feeds the fusion; ELMo's scalar mix, Peters et al. 2018).

It lives in the NMT model (``bert_mix.*``), not in the pretrained encoder (``bert.*``): the encoder
may be frozen while these weights train (report group "fusion").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerMix(nn.Module):
    """``gamma * sum_l softmax(w)_l * h_l`` over the ``n_states`` hidden states (embeddings + every block).

    ``w`` starts at zero (a uniform average) and ``gamma`` at one.
    """

    def __init__(self, n_states: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_states))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, states: Tensor) -> Tensor:
        """states (L+1, B, E, H) -> (B, E, H)."""
        if states.size(0) != self.weights.numel():
            raise ValueError(f"LayerMix expects {self.weights.numel()} hidden states, got {states.size(0)}")
        w = torch.softmax(self.weights, dim=0).to(states.dtype)  # (L+1,)
        return self.gamma.to(states.dtype) * torch.einsum("l,lbeh->beh", w, states)  # (B, E, H)
