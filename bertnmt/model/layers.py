"""Transformer building blocks: SDPA multi-head attention with a KV cache, FFN, positions.

Shape letters: B batch, T query length, S key length, C model width, H heads, Dh = C / H.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KV = tuple[Tensor, Tensor]  # keys, values, each (B, H, S, Dh)


class MultiheadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) on ``F.scaled_dot_product_attention``.

    One module serves three uses:

    * full self-attention (``key_value=None``, optionally ``causal=True``);
    * incremental self-attention: pass a per-layer :class:`KVCache`; this step's keys/values
      are appended to it;
    * attention over a static memory (encoder-decoder attention, BERT attention of paper
      section 4): ``key_value=memory``, or keys/values computed once with :meth:`precompute_kv`
      and passed as ``static_kv`` at every decoding step.

    ``kdim`` is the width of the key/value input (the pretrained encoder's width for the BERT
    branch); ``k_proj`` / ``v_proj`` map it to ``d_model`` directly, without a separate projection.
    """

    def __init__(self, d_model: int, heads: int, kdim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if d_model % heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
        self.kdim = kdim if kdim is not None else d_model
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(self.kdim, d_model)
        self.v_proj = nn.Linear(self.kdim, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform, as fairseq: gain 1/sqrt(2) for q/k/v when they share the width."""
        gain = 1 / math.sqrt(2) if self.kdim == self.d_model else 1.0
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
            nn.init.zeros_(proj.bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.unflatten(2, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)

    def precompute_kv(self, memory: Tensor) -> KV:
        """Keys and values of a static memory ``(B, S, kdim)``, computed once per sentence."""
        return self._split_heads(self.k_proj(memory)), self._split_heads(self.v_proj(memory))

    def forward(
        self,
        query: Tensor,
        key_value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        static_kv: KV | None = None,
    ) -> Tensor:
        """Attend from ``query`` (B, T, C); returns (B, T, C).

        key_value: (B, S, kdim) memory, or None for self-attention.
        key_padding_mask: (B, S) bool, True = padding (never attended); (Bs, S) with static_kv.
        causal: mask future keys (query i sees keys <= i, aligned to the end of the keys).
        cache: incremental self-attention state; this step's keys/values are appended to it.
        static_kv: precomputed ``(k, v)`` from :meth:`precompute_kv`, each (Bs, H, S, Dh);
            overrides ``key_value``. ``Bs`` may divide ``B``: then each group of ``B // Bs``
            consecutive query rows (the beams of one sentence) shares one memory row, so the
            keys are never repeated per beam.
        """
        B, T, _ = query.shape
        q = self._split_heads(self.q_proj(query))  # (B, H, T, Dh)
        if static_kv is not None:
            k, v = static_kv  # (Bs, H, S, Dh)
        elif cache is not None:
            src = query if key_value is None else key_value
            k, v = cache.append(*self.precompute_kv(src))  # (B, H, t, Dh) each
        else:
            k, v = self.precompute_kv(query if key_value is None else key_value)  # (B, H, S, Dh)
        Bs, S = k.size(0), k.size(2)
        G = B // Bs  # query rows per memory row
        if G * Bs != B or (G != 1 and causal):
            raise ValueError(f"{B} query rows cannot share {Bs} memory rows")
        if G != 1:  # (Bs * G, H, T, Dh) -> (Bs, H, G * T, Dh): the group's queries side by side
            q = q.view(Bs, G, self.heads, T, self.head_dim).transpose(1, 2)
            q = q.reshape(Bs, self.heads, G * T, self.head_dim)
        Tq = q.size(2)

        # Boolean SDPA mask, True = attend; built only when needed.
        attn_mask: Tensor | None = None
        is_causal = False
        if causal and T > 1:
            if key_padding_mask is None and S == T:
                is_causal = True
            else:
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]  # (Bs, 1, 1, S)
            attn_mask = keep if attn_mask is None else keep & attn_mask  # (B, 1, T, S)

        if Tq <= 8 and not is_causal and not self.training and q.device.type == "cpu":
            # A few queries per row (incremental decoding): plain bmm beats the CPU SDPA kernel.
            q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (Bs * H, ., Dh)
            scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(self.head_dim**-0.5)  # (Bs * H, Tq, S)
            if attn_mask is not None:
                scores.view(Bs, self.heads, Tq, S).masked_fill_(~attn_mask, float("-inf"))
            out = torch.bmm(scores.softmax(dim=-1), v3).view(Bs, self.heads, Tq, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (Bs, H, Tq, Dh)
        if G != 1:
            out = out.view(Bs, self.heads, G, T, self.head_dim).transpose(1, 2)  # (Bs, G, H, T, Dh)
            out = out.reshape(B, self.heads, T, self.head_dim)
        out = out.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, C)
        return self.out_proj(out)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in fp32 under any autocast, returning fp32 (the residual stream stays fp32).

    CUDA's autocast already runs layer norm in fp32; the CPU's does not, so this makes bf16 training
    normalise alike on every device. Same parameters and names as ``nn.LayerNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


class KVCache:
    """Keys and values of incremental self-attention, for one layer: (N, H, t, Dh) each.

    Preallocated along time (capacity doubles on demand) and double-buffered: appending a step
    writes in place, and a beam reorder copies exactly the ``t`` filled steps into the spare
    buffer. (Concatenating and re-indexing fresh tensors at every step made the cache about a
    quarter of CPU beam-search time.)
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None  # (N, H, cap, Dh)
        self.v: Tensor | None = None
        self._spare: tuple[Tensor, Tensor] | None = None
        self.len = 0

    def append(self, k: Tensor, v: Tensor) -> KV:
        """Add this step's keys/values (N, H, T, Dh); return all of them (N, H, t, Dh)."""
        N, H, T, Dh = k.shape
        end = self.len + T
        if self.k is None or end > self.k.size(2):
            cap = max(32, 2 * end)
            new_k, new_v = k.new_empty(N, H, cap, Dh), v.new_empty(N, H, cap, Dh)
            if self.k is not None:
                new_k[:, :, : self.len] = self.k[:, :, : self.len]
                new_v[:, :, : self.len] = self.v[:, :, : self.len]
            self.k, self.v, self._spare = new_k, new_v, None
        self.k[:, :, self.len : end] = k
        self.v[:, :, self.len : end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (N',) of the batch, in that order."""
        if self.k is None:
            return
        t = self.len
        if self.k.requires_grad:  # not the inference path: plain, differentiable indexing
            self.k = self.k[:, :, :t].index_select(0, index)
            self.v = self.v[:, :, :t].index_select(0, index)
            self._spare = None
            return
        shape = (index.numel(),) + tuple(self.k.shape[1:])
        spare = self._spare
        if spare is None or tuple(spare[0].shape) != shape:
            spare = (self.k.new_empty(shape), self.v.new_empty(shape))
        torch.index_select(self.k[:, :, :t], 0, index, out=spare[0][:, :, :t])
        torch.index_select(self.v[:, :, :t], 0, index, out=spare[1][:, :, :t])
        self._spare = (self.k, self.v)
        self.k, self.v = spare


class FeedForward(nn.Module):
    """Position-wise FFN with its residual-branch dropout: ``drop(fc2(act_drop(relu(fc1(x)))))``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0, act_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.act_dropout = nn.Dropout(act_dropout)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act_dropout(F.relu(self.fc1(x)))))  # (B, T, C)


def sinusoid_table(n: int, dim: int) -> Tensor:
    """fairseq-style sinusoids: ``[sin(p * w_i) | cos(p * w_i)]``, one row per position ``p``."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(n, dtype=torch.float)[:, None] * freq[None, :]  # (n, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(n, 1)], dim=1)
    return table  # (n, dim)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position embeddings (no parameters, nothing in the state dict).

    ``forward(T, start)`` returns positions ``start .. start + T - 1``; ``start`` is the step
    of incremental decoding. The table grows on demand beyond ``max_positions``.
    """

    def __init__(self, dim: int, max_positions: int = 1024):
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoid_table(max_positions, dim), persistent=False)

    def forward(self, length: int, start: int = 0) -> Tensor:
        end = start + length
        if end > self.table.size(0):
            self.table = sinusoid_table(max(end, 2 * self.table.size(0)), self.dim).to(self.table)
        return self.table[start:end]  # (T, C)
