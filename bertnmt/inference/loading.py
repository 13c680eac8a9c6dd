"""Loading a trained model for translation: ``load_model(path)`` takes an exported folder (see
:mod:`bertnmt.recipe.export` for its layout), a checkpoint or a run directory, and returns a
:class:`~bertnmt.inference.translator.Translator`.

A frozen encoder is loaded from its recorded name or path (``bert_path=`` points it elsewhere), and an
encoder whose weights differ from the ones the model was trained with is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf.errors import OmegaConfBaseException

from bertnmt.core.config import Config, to_config
from bertnmt.core.errors import CheckpointError, one_line
from bertnmt.data.tokenize import EncoderTokenizer, SubwordVocab
from bertnmt.inference.translator import Translator
from bertnmt.model.build import make_model, weights_sha256
from bertnmt.model.pretrained import check_tokenizer
from bertnmt.recipe.export import (CONFIG, EXPORT_FORMAT, EXPORT_VERSION, INFO, REQUIRED, VOCAB, WEIGHTS,
                                   checkpoint_context, encoder_info, find_checkpoint, is_export, read_yaml)
from bertnmt.train.checkpoint import load_model_weights


def _build(cfg: Config, weights: dict[str, torch.Tensor], vocab: SubwordVocab, encoder: dict[str, Any] | None,
           device: str, source: str, origin: str | None = None) -> Translator:
    """The Translator; ``origin`` (the config's file) is named when the config does not fit the weights."""
    try:
        model = make_model(cfg, len(vocab), vocab.pad_id)
    except (ValueError, AssertionError, RuntimeError, TypeError, ArithmeticError) as e:  # dimensions that do not fit
        raise CheckpointError(f"{origin or source}: its model section describes no model that can be built "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    try:
        load_model_weights(model, weights, source)
    except CheckpointError as e:
        if origin is None:
            raise
        raise CheckpointError(f"{origin}: the model it describes does not fit the weights ({e})") from None
    tokenizer = None
    if model.bert is not None:
        enc = encoder or {}
        expected = enc.get("weights_sha256")
        if expected and not enc.get("weights_included") and weights_sha256(model.bert) != expected:
            raise CheckpointError(
                f"{source}: the encoder at bert.path={cfg.bert.path!r} is not the one this model was trained with "
                f"(weights sha256 {expected[:12]}); point bert_path / --bert-path at that encoder"
            )
        tokenizer = EncoderTokenizer(cfg.bert.path, cfg.bert.max_length, cfg.bert.trust_remote_code)
        check_tokenizer(cfg.bert, len(tokenizer), tokenizer.pad_id)
    return Translator(cfg, model, vocab, tokenizer, device, source)


def _load_export(folder: Path, device: str, bert_path: str | None) -> Translator:
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete bertnmt export, missing {', '.join(missing)}")
    try:
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / INFO}: unreadable ({e})") from None
    if info.get("format") != EXPORT_FORMAT or info.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{folder / INFO}: format {info.get('format')!r} version {info.get('version')!r}; "
                              f"this bertnmt reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
    raw = read_yaml(folder / CONFIG)
    try:
        cfg = to_config(raw)
    except OmegaConfBaseException as e:
        raise CheckpointError(f"{folder / CONFIG}: not a valid config ({one_line(e)})") from None
    if bert_path:
        cfg.bert.path = bert_path
    vocab = SubwordVocab(folder / VOCAB)
    want = (info.get("vocab") or {}).get("sha256")
    if want and vocab.sha256 != want:
        raise CheckpointError(f"{folder / VOCAB}: sha256 {vocab.sha256[:12]} differs from export.json's {want[:12]}")
    try:
        from safetensors.torch import load_file

        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{folder / WEIGHTS}: cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    return _build(cfg, weights, vocab, info.get("encoder"), device, str(folder), str(folder / CONFIG))


def load_model(path: str | Path, device: str = "auto", bert_path: str | None = None,
               vocab: str | Path | None = None, config: str | Path | None = None) -> Translator:
    """A :class:`~bertnmt.inference.translator.Translator` from an exported folder, a checkpoint or a run directory.

    ``bert_path`` replaces the encoder's recorded name or path (the weights must be the same);
    ``vocab`` and ``config`` name the SentencePiece model and the run config (``config.yaml``) of a
    checkpoint that carries neither and sits outside its run directory.
    """
    path = Path(path)
    if path.is_dir():
        if is_export(path):
            return _load_export(path, device, bert_path)
        if is_export(path / "export"):
            return _load_export(path / "export", device, bert_path)
        if (path / "checkpoints").is_dir():
            path = find_checkpoint(path)
        else:
            missing = [f for f in REQUIRED if not (path / f).is_file()]
            raise CheckpointError(f"{path}: incomplete bertnmt export, missing {', '.join(missing)}")
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or exported model")
    ctx = checkpoint_context(path, vocab, config)
    if bert_path:
        ctx.cfg.bert.path = bert_path
    encoder = encoder_info(ctx.cfg, ctx.meta, ctx.ckpt["model"])
    return _build(ctx.cfg, ctx.ckpt["model"], SubwordVocab(ctx.vocab_path), encoder, device, str(path))
