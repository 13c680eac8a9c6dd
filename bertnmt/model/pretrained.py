"""The pretrained encoder that produces H_B (paper section 4), wrapped for freezing.

While ``frozen`` the wrapper holds its Hugging Face model in eval mode (no dropout, even when a
parent calls ``.train()``) and runs it under ``torch.no_grad()`` (not ``inference_mode``: its
outputs feed trainable layers whose backward pass must be able to save them).

Two controls of the paper's ablations (section 6) live here too, so that every consumer of H_B sees
them: ``bert.random_init`` (the same architecture, randomly initialised) and ``bert.features=random``
(H_B replaced by random vectors of the same shape, fixed per sentence).
"""
from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import numpy as np

import torch
from torch import Tensor, nn

from bertnmt.core.config import BertConfig
from bertnmt.core.errors import ConfigError
from bertnmt.model.variants import check_bert_config


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


@contextlib.contextmanager
def _quiet_hf():
    """Silence the load report (the unused pooler weights) and progress bars while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(path: str, **kwargs):
    """``AutoModel.from_pretrained`` without the pooler where the class has one."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    except TypeError as err:  # DistilBERT, ELECTRA, ...: no pooler argument
        if "add_pooling_layer" not in str(err):
            raise
        return AutoModel.from_pretrained(path, **kwargs)


def _random_model(path: str, seed: int, **kwargs):
    """The architecture of ``path`` with freshly initialised weights (the ``bert.random_init`` control).

    Built under a forked RNG seeded with ``seed``: the same seed always gives the same weights, so a
    frozen random encoder (which checkpoints do not store) is rebuilt identically, and the caller's
    RNG stream is unchanged.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, **kwargs)
    code = {"trust_remote_code": kwargs["trust_remote_code"]} if "trust_remote_code" in kwargs else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return AutoModel.from_config(config, add_pooling_layer=False, **code)
        except TypeError as err:  # no pooler argument
            if "add_pooling_layer" not in str(err):
                raise
            torch.manual_seed(seed)
            return AutoModel.from_config(config, **code)


def random_features(enc_ids: Tensor, enc_mask: Tensor, dim: int, seed: int = 0) -> Tensor:
    """Standard normal vectors in place of H_B (the ``bert.features=random`` control), fixed per sentence.

    Each sentence's vectors come from a generator seeded with a CRC-32 of its real encoder ids (and
    ``seed``): a sentence gets the same vectors in every epoch, batch and padding, two different
    sentences different ones. Padding positions are zero. enc_ids, enc_mask (B, E) -> (B, E, dim) fp32.
    """
    B, E = enc_ids.shape
    out = torch.zeros(B, E, dim)  # (B, E, dim)
    ids, mask = enc_ids.cpu(), enc_mask.cpu().bool()
    for b in range(B):
        real = ids[b][mask[b]].numpy().astype(np.int64)  # (n,)
        g = torch.Generator().manual_seed(zlib.crc32(real.tobytes(), seed & 0xFFFFFFFF))
        out[b, mask[b]] = torch.randn(real.size, dim, generator=g)
    return out.to(enc_ids.device)


class PretrainedEncoder(nn.Module):
    """``AutoModel`` without pooler; returns the hidden states chosen by ``cfg.layer``.

    layer = -1: ``last_hidden_state`` (paper default); otherwise ``hidden_states[layer]``
    (0 = embeddings, k = after block k, negative indexes count from the end).
    :meth:`all_layers` returns every hidden state, for the learned mix (``bert.layer_mix``).
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        from bertnmt.data.tokenize import resolve_model_path

        check_bert_config(cfg)
        self.name = cfg.path
        path = resolve_model_path(cfg.path)  # pypi:<module> -> its folder; raises ConfigError
        try:
            with _quiet_hf():
                if cfg.random_init:  # control: the architecture only, from its config file
                    model = _random_model(path, cfg.random_seed, trust_remote_code=cfg.trust_remote_code)
                elif Path(path).is_dir():
                    model = _from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
                else:  # a hub name: the local HF cache first, the network only when allowed
                    try:
                        model = _from_pretrained(
                            path, trust_remote_code=cfg.trust_remote_code, local_files_only=True
                        )
                    except OSError:
                        if _hub_offline():
                            raise
                        model = _from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            if not Path(path).is_dir() and isinstance(err, OSError):
                raise ConfigError(
                    f"pretrained encoder {cfg.path!r} is not available offline: "
                    "download it once or set bert.path=/a/local/folder"
                ) from err
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"bert.path={cfg.path!r}: cannot load a pretrained encoder: {first}") from err
        self.model = model
        # The files the weights came from: their hash identifies the weights without reading the (memory-mapped)
        # tensors into this process's memory. Whoever replaces or re-initialises ``self.model`` must clear it.
        self.weight_files: list[Path] = (
            sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() and not cfg.random_init else []
        )
        self.hidden_size: int = int(model.config.hidden_size)
        n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        if n_layers and not -(n_layers + 1) <= cfg.layer <= n_layers:
            raise ConfigError(
                f"bert.layer={cfg.layer} is out of range for the {n_layers}-layer encoder {cfg.path!r}"
            )
        self.layer = cfg.layer
        self.n_states = n_layers + 1  # the hidden states: embeddings + one per block
        self.layer_mix = cfg.layer_mix  # the model mixes all_layers() with its own weights (bert_mix)
        self.random_features = cfg.features == "random"
        self.random_seed = cfg.random_seed
        self.frozen = False  # set by the freeze policy (bertnmt.train.freeze); enforced here
        self._mode = True  # the mode last asked for by ``train()``, restored on unfreezing
        self.train()  # from_pretrained returns eval mode; start like any new nn.Module

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze): flag, ``requires_grad`` of every parameter, and eval mode."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        self.train(self._mode)

    def train(self, mode: bool = True) -> "PretrainedEncoder":
        """Like ``nn.Module.train``, but while frozen everything stays in eval mode (no dropout)."""
        self._mode = mode
        return super().train(mode and not self.frozen)

    def forward(self, enc_ids: Tensor, enc_mask: Tensor) -> Tensor:
        """enc_ids (B, E) long, enc_mask (B, E) 1 = real token -> H_B (B, E, hidden_size)."""
        if self.random_features:  # control: the encoder does not run
            return random_features(enc_ids, enc_mask, self.hidden_size, self.random_seed)  # (B, E, H)
        ctx = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with ctx:
            out = self.model(
                input_ids=enc_ids, attention_mask=self._attention_mask(enc_mask),
                output_hidden_states=self.layer != -1, return_dict=True,
            )
            if self.layer == -1:
                return out.last_hidden_state  # (B, E, H)
            return out.hidden_states[self.layer]  # (B, E, H)

    def all_layers(self, enc_ids: Tensor, enc_mask: Tensor) -> Tensor:
        """Every hidden state, stacked: (n_states, B, E, hidden_size) (embeddings first)."""
        ctx = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=enc_ids, attention_mask=self._attention_mask(enc_mask), output_hidden_states=True,
                             return_dict=True)
            return torch.stack(out.hidden_states)  # (L+1, B, E, H)

    def _attention_mask(self, enc_mask: Tensor) -> Tensor:
        """The padding mask as the encoder gets it. With SDPA attention a 4-D boolean one (B, 1, 1, E), True =
        attend, which transformers uses as it is: from the 2-D one it would first test whether the batch has any
        padding at all, which makes the host wait for the device."""
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa" and enc_mask.dim() == 2:
            return enc_mask.bool()[:, None, None, :]  # (B, 1, 1, E)
        return enc_mask


MIN_TOKENIZER_SIZE = 100  # fewer tokens: the tokenizer files are missing (transformers then builds an empty one)


def check_tokenizer(cfg: BertConfig, vocab_len: int, pad_id: int) -> None:
    """The encoder tokenizer's ids must fit the encoder's embedding table (a clear error, not an IndexError), and
    cover at least half of it (a tokenizer built without its vocabulary files maps every word to [UNK]).

    ``vocab_len`` is the tokenizer's size (its largest id + 1) and ``pad_id`` the id it pads with.
    """
    from transformers import AutoConfig

    from bertnmt.data.tokenize import resolve_model_path

    path = resolve_model_path(cfg.path)
    try:
        with _quiet_hf():
            conf = AutoConfig.from_pretrained(path, local_files_only=not Path(path).is_dir() and _hub_offline(),
                                              trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # PretrainedEncoder reports an encoder it cannot load
    size = getattr(conf, "vocab_size", None)
    if vocab_len < MIN_TOKENIZER_SIZE or (isinstance(size, int) and 2 * vocab_len < size):
        rows = f" but the encoder's embedding table has {size} rows" if isinstance(size, int) else ""
        raise ConfigError(
            f"bert.path={cfg.path!r}: its tokenizer has only {vocab_len} tokens{rows}; its tokenizer files "
            "(vocab.txt, tokenizer.json, ...) are missing or incomplete, and every word would be [UNK]"
        )
    if isinstance(size, int) and max(vocab_len - 1, pad_id) >= size:
        raise ConfigError(
            f"bert.path={cfg.path!r}: its tokenizer has {vocab_len} tokens (pad id {pad_id}) but the encoder's "
            f"embedding table has {size} rows; the tokenizer does not belong to this encoder"
        )
