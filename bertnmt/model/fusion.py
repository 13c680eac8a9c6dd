"""The BERT-fused sublayer and drop-net (paper section 4), and the names of the modules a plain
Transformer lacks. Both fused layers (:mod:`bertnmt.model.encoder`, :mod:`bertnmt.model.decoder`) mix
their two attention branches with :class:`FusedSublayer`; nothing else writes the mixing."""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from bertnmt.core.config import FusionCombine, ModelConfig
from bertnmt.model.layers import LayerNorm, MultiheadAttention

# The NMT modules a plain Transformer lacks, by attribute name: BERT attention (paper section 4), the
# stacked variant's LayerNorm, the learned layer mix and the feature-based input projection (section 6;
# ``BertFusedTransformer.bert_mix`` / ``bert_proj``). Warm start may leave them new; they form the freeze
# group "fusion". A test builds every variant and checks that exactly these names are new.
FUSION_MODULES = frozenset({"bert_attn", "bert_attn_ln", "bert_mix", "bert_proj"})

Weight = Tensor | float  # a drop-net weight: a host float, or a 0-dim tensor drawn on the device


def is_fusion_param(name: str) -> bool:
    """Whether a parameter (or state-dict key) lies inside one of the :data:`FUSION_MODULES`."""
    return not FUSION_MODULES.isdisjoint(name.split(".")[:-1])


def is_drop_net_state(key: str) -> bool:
    """Whether a state-dict key is a :class:`DropNet`'s generator state (not a weight)."""
    return key.endswith("drop_net." + _EXTRA_STATE_KEY_SUFFIX)


class BertAttention(MultiheadAttention):
    """BERT-encoder attention (paper section 4, eqs. 1-2): queries from the NMT layer, keys and
    values from H_B. The key/value input width ``kdim`` is the pretrained encoder's hidden size;
    ``k_proj`` / ``v_proj`` map it to ``d_model`` with no separate projection, as in the official
    code. New modules are Xavier-initialised (paper section 4).
    """

    def __init__(self, d_model: int, heads: int, bert_dim: int, dropout: float = 0.0):
        super().__init__(d_model, heads, kdim=bert_dim, dropout=dropout)

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)


class DropNet(nn.Module):
    """Drop-net (paper section 4): the weights (w1, w2) of (first branch, BERT branch) of a fused sublayer.

    In training one uniform ``u`` is drawn per fused layer per forward: ``u < p/2`` keeps only the first
    branch (self- or encoder-decoder attention), ``u > 1 - p/2`` only the BERT branch, otherwise both are
    averaged; at inference always the average. A weight of 0.0 means the branch is not computed.

    ``u`` comes from this module's own Python generator, on the host (deciding which branch to run makes
    the host wait for no device), so other random draws (dropout masks of each rank's batch shape) never
    shift it. :meth:`seed` restarts it; its state is the module's extra state, so state dicts and
    checkpoints carry it and a resumed run draws what the uninterrupted one drew. One instance is shared
    by all fused layers of a model (:class:`~bertnmt.model.nmt.BertFusedTransformer`): one stream of draws,
    in layer order. With ``on_device`` (``trainer.compile``) ``u`` is drawn on the device from torch's RNG
    instead: both branches are then computed, a dropped one multiplied by 0 (no data-dependent branch).
    """

    def __init__(self, p: float, seed: int = 0):
        super().__init__()
        self.p = p
        self.on_device = False
        self.rng = random.Random(seed)

    def extra_repr(self) -> str:
        return f"p={self.p}, on_device={self.on_device}"

    def seed(self, seed: int) -> None:
        """Restart the host-side draws from ``seed``."""
        self.rng.seed(seed)

    def draw(self, training: bool, like: Tensor) -> tuple[Weight, Weight]:
        """(w1, w2) for one fused layer's forward; ``like``: a tensor on the device of an on-device draw."""
        p = self.p
        if not training or p <= 0.0:
            return 0.5, 0.5
        if self.on_device:
            u = torch.rand((), device=like.device)  # ()
            w1 = torch.where(u < p / 2, 1.0, torch.where(u > 1.0 - p / 2, 0.0, 0.5)).to(like.dtype)
            return w1, 1.0 - w1
        u = self.rng.random()
        if u < p / 2:
            return 1.0, 0.0
        if u > 1.0 - p / 2:
            return 0.0, 1.0
        return 0.5, 0.5

    def get_extra_state(self) -> Tensor:
        """The generator's state as one int64 tensor (626,): version, then the Mersenne Twister's 625 words
        (a tensor, so that checkpoints stay ``weights_only``-loadable; ``gauss`` is never drawn here)."""
        version, internal, _ = self.rng.getstate()
        return torch.tensor([version, *internal], dtype=torch.int64)  # (626,)

    def set_extra_state(self, state: Tensor) -> None:
        version, *internal = state.tolist()
        self.rng.setstate((version, tuple(internal), None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001  (torch's signature)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + _EXTRA_STATE_KEY_SUFFIX
        if key in missing_keys:  # a state dict from before drop-net's state was saved: keep the current draws
            missing_keys.remove(key)


def runs(weight: Weight) -> bool:
    """Whether a drop-net branch must be computed: always for a device-side weight, else when not 0."""
    return isinstance(weight, Tensor) or weight != 0.0


Branch = Callable[[Tensor], Tensor]  # (B, T, C) -> (B, T, C): one attention given its (normalised) query input


class FusedSublayer(nn.Module):
    """The residual sublayer of two attentions over the same input, mixed by drop-net (paper eqs. 1 and 3).

    Post-LN (paper): ``LN(x + w1·drop(first(x)) + w2·drop(bert(x)))``; pre-LN:
    ``x + w1·drop(first(LN(x))) + w2·drop(bert(LN(x)))``. (w1, w2) come from :class:`DropNet`; a branch
    whose weight is 0 is not run. Without a BERT branch it is the plain residual sublayer of ``first``
    (w1 = 1). ``stacked`` (``model.fusion_combine=stacked``, ablation of section 6): ``first``, then ``bert``,
    each its own residual sublayer (the second with ``bert_ln``), no drop-net.

    It holds no weights: the attentions and LayerNorms stay the layer's own modules (their parameter names
    are those of a plain Transformer layer plus ``bert_attn``), passed in at each call.
    """

    def __init__(self, pre_ln: bool, dropout: float, drop_net: DropNet | None = None, stacked: bool = False):
        super().__init__()
        self.pre_ln, self.dropout, self.stacked = pre_ln, dropout, stacked
        self.drop_net = None if stacked else drop_net

    def residual(self, x: Tensor, ln: nn.Module, fn: Branch) -> Tensor:
        """One residual sublayer, post-LN ``LN(x + drop(fn(x)))`` or pre-LN ``x + drop(fn(LN(x)))``."""
        if self.pre_ln:
            return x + F.dropout(fn(ln(x)), self.dropout, self.training)
        return ln(x + F.dropout(fn(x), self.dropout, self.training))

    def forward(self, x: Tensor, ln: nn.Module, first: Branch, bert: Branch | None = None,
                bert_ln: nn.Module | None = None) -> Tensor:  # x: (B, T, C)
        if bert is not None and self.stacked:
            if bert_ln is None:
                raise ValueError("a stacked fused sublayer needs bert_ln")
            return self.residual(self.residual(x, ln, first), bert_ln, bert)  # (B, T, C)
        if bert is None:
            w1, w2 = 1.0, 0.0
        elif self.drop_net is None:
            raise ValueError("a fused sublayer with a BERT branch needs a DropNet")
        else:
            w1, w2 = self.drop_net.draw(self.training, x)
        h = ln(x) if self.pre_ln else x
        y = x
        if runs(w1):
            y = y + w1 * F.dropout(first(h), self.dropout, self.training)
        if runs(w2):
            y = y + w2 * F.dropout(bert(h), self.dropout, self.training)  # type: ignore[misc]
        return y if self.pre_ln else ln(y)  # (B, T, C)


def add_fusion(layer: nn.Module, cfg: ModelConfig, bert_dim: int | None, drop_net: DropNet | None = None) -> None:
    """Give a fused encoder or decoder layer its fusion parts (paper section 4), under the names that
    checkpoints and ``FUSION_MODULES`` use: ``bert_attn`` (None without H_B), ``bert_attn_ln`` (stacked
    combination only), ``stacked``, and ``fused``, the residual sublayer that mixes the two branches.
    ``drop_net`` is the model's shared instance; a layer built alone gets its own."""
    layer.bert_attn = BertAttention(cfg.d_model, cfg.heads, bert_dim, dropout=cfg.attn_dropout) if bert_dim else None
    layer.stacked = bool(bert_dim) and cfg.fusion_combine == FusionCombine.stacked
    layer.bert_attn_ln = LayerNorm(cfg.d_model) if layer.stacked else None
    if bert_dim and drop_net is None:
        drop_net = DropNet(cfg.drop_net)
    layer.fused = FusedSublayer(cfg.pre_ln, cfg.dropout, drop_net if bert_dim else None, layer.stacked)


def drop_nets(model: nn.Module) -> list[DropNet]:
    """The model's distinct :class:`DropNet` modules (one, shared by its fused layers; none without fusion)."""
    return [m for m in model.modules() if isinstance(m, DropNet)]


def seed_drop_net(model: nn.Module, seed: int) -> None:
    """Restart the model's host-side drop-net draws from ``seed`` (the Trainer passes ``trainer.seed``, the same
    on every rank, so that under DDP every rank keeps or skips the same branch in every layer)."""
    for i, m in enumerate(drop_nets(model)):
        m.seed(seed + i)


def set_drop_net_on_device(model: nn.Module, on: bool) -> None:
    """Draw drop-net on the device (True, for ``torch.compile(fullgraph=True)``) or on the host (False)."""
    for m in drop_nets(model):
        m.on_device = on
