"""Building the model a config describes, and identifying a module by its weights."""
from __future__ import annotations

import hashlib

import torch

from bertnmt.core.config import Config
from bertnmt.data.tokenize import SubwordVocab
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder


def make_model(cfg: Config, vocab_size: int, pad_id: int = SubwordVocab.pad_id) -> BertFusedTransformer:
    bert = PretrainedEncoder(cfg.bert) if cfg.model.fused else None
    return BertFusedTransformer(cfg.model, vocab_size, pad_id, bert)


def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of a module's weights (recorded instead of storing a frozen encoder in checkpoints).

    A pretrained encoder just loaded from safetensors files is identified by those files, read in chunks
    (its memory-mapped tensors stay out of the resident set); otherwise by its tensors' bytes."""
    h = hashlib.sha256()
    files = getattr(module, "weight_files", None)
    if files:
        h.update(b"files")
        for f in files:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        return h.hexdigest()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy()))  # no copy of the bytes
    return h.hexdigest()
