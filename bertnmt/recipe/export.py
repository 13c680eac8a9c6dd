"""A trained model as a folder that ``bertnmt.load_model(path)`` restores for translation, no Hydra needed.

Layout of an exported folder::

    model.safetensors   the NMT weights (and the pretrained encoder's only when it was trained)
    config.yaml         the resolved run config (its ``model`` section is the exported stage's)
    spm.model           the joint SentencePiece vocabulary
    export.json         format version, the encoder's name / path / layer and the sha256 of its
                        weights, the vocabulary's sha256, the source checkpoint, epoch and step

A frozen encoder is not copied: ``load_model`` loads it from its name or path (``bert_path=``
points it elsewhere) and refuses an encoder whose weights differ from the ones trained with.

``load_model`` also takes a checkpoint (``checkpoint_*.pt``, an averaged one) or a run directory.
A checkpoint finds its config in ``meta["config"]`` (or the run's ``config.yaml``) and its
vocabulary through ``meta["vocab_path"]``, the run's ``export/`` or the prepared-data cache,
always checked against the sha256 that training recorded.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bertnmt.core import __version__
from bertnmt.core.atomic import fsync_dir, fsync_file, temp_name, write_error
from bertnmt.train.averaging import checkpoint_folder
from bertnmt.train.checkpoint import load_checkpoint
from bertnmt.core.config import Config, ModelConfig, to_config
from bertnmt.data.tokenize import SubwordVocab
from bertnmt.core.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "bertnmt-export"
EXPORT_VERSION = 1
WEIGHTS, CONFIG, VOCAB, INFO = "model.safetensors", "config.yaml", "spm.model", "export.json"
REQUIRED = (INFO, CONFIG, WEIGHTS, VOCAB)


@dataclass
class CheckpointContext:
    """A checkpoint with what it needs to translate: its config and its SentencePiece model."""

    path: Path
    ckpt: dict[str, Any]
    cfg: Config
    vocab_path: Path

    @property
    def meta(self) -> dict[str, Any]:
        return self.ckpt.get("meta") or {}


def is_export(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def find_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run's final stage (``checkpoints/fused``, else ``checkpoints/baseline``)."""
    path = checkpoint_folder(run_dir) / "checkpoint_best.pt"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoints/{{fused,baseline}}/checkpoint_best.pt (not a run directory?)")
    return path


def _sha256(path: Path) -> str:
    from bertnmt.data.corpora import file_sha256

    return file_sha256(path)


def read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid config ({' '.join(str(e).split())[:200]})") from None


def _load_config(path: Path, meta: dict[str, Any], config: str | Path | None = None) -> Config:
    """The run's config: ``config`` if given, else ``meta["config"]``, else ``config.yaml`` of the run;
    ``model`` from ``meta["model"]``."""
    raw: Any = meta.get("config")
    origin = f"{path} (meta.config)"
    if config is not None:
        if not Path(config).is_file():
            raise CheckpointError(f"config {config} does not exist")
        raw, origin = read_yaml(Path(config)), str(config)
    elif not isinstance(raw, dict):
        found = next((d / "config.yaml" for d in list(path.parents)[:3] if (d / "config.yaml").is_file()), None)
        if found is None:
            raise CheckpointError(f"checkpoint {path} carries no config and no config.yaml is beside it "
                                  "(expected in its run directory); pass one with --config / config=")
        raw, origin = read_yaml(found), str(found)
    try:
        cfg = to_config(raw)
        if isinstance(meta.get("model"), dict):  # the stage's own model (the baseline of a fused run is plain)
            cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))
    except OmegaConfBaseException as e:
        raise CheckpointError(f"{origin}: config does not match this bertnmt ({str(e).splitlines()[0]})") from None
    return cfg


def _find_vocab(path: Path, cfg: Config, meta: dict[str, Any], vocab: str | Path | None) -> Path:
    expected = meta.get("vocab_sha256")
    if vocab is not None:
        vocab = Path(vocab)
        if not vocab.is_file():
            raise DataError(f"{vocab}: SentencePiece model not found")
        if expected and _sha256(vocab) != expected:
            raise CheckpointError(f"{vocab} is not the vocabulary of checkpoint {path} "
                                  f"(sha256 {_sha256(vocab)[:12]}, expected {expected[:12]})")
        return vocab
    candidates: list[Path] = []
    if meta.get("vocab_path"):
        candidates.append(Path(meta["vocab_path"]))
    candidates += [d / "export" / VOCAB for d in list(path.parents)[:3]]
    if meta.get("data_key"):  # the prepared-data cache: <cache_dir>/<corpus>-<src>-<tgt>-<key>/spm.model
        d = cfg.data
        candidates.append(Path(d.cache_dir) / f"{d.corpus}-{d.src_lang}-{d.tgt_lang}-{meta['data_key']}" / VOCAB)
    for cand in candidates:
        if cand.is_file() and (not expected or _sha256(cand) == expected):
            return cand
    sha = f" (sha256 {expected[:12]})" if expected else ""
    raise CheckpointError(f"cannot find the SentencePiece model of checkpoint {path}{sha}; pass it with --vocab / vocab=")


def checkpoint_context(path: str | Path, vocab: str | Path | None = None,
                       config: str | Path | None = None) -> CheckpointContext:
    """Load a checkpoint and resolve its config and vocabulary (see the module docstring)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    cfg = _load_config(path, meta, config)
    return CheckpointContext(path, ckpt, cfg, _find_vocab(path, cfg, meta, vocab))


def encoder_info(cfg: Config, meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if not cfg.model.fused:
        return None
    enc = meta.get("encoder") or {}
    return {"name": cfg.bert.name, "path": cfg.bert.path, "layer": cfg.bert.layer, "max_length": cfg.bert.max_length,
            "weights_sha256": enc.get("weights_sha256"), "weights_included": any(k.startswith("bert.") for k in weights)}


def _run_folder(src: Path) -> Path:
    """The run folder of a source: a run directory itself; for a checkpoint, its run (or its folder)."""
    if src.is_dir():
        return src
    if src.parent.parent.name == "checkpoints":  # <run>/checkpoints/<stage>/checkpoint_*.pt
        return src.parent.parent.parent
    return src.parent


def check_export_target(src: str | Path, out_dir: str | Path) -> bool:
    """Refuse a target that holds what export did not write; True if it is an earlier export (replaced).

    The target must not be the source's run folder or a folder above it (its files would be lost),
    and must be absent, an empty folder, or an earlier export (``export.json`` of this format).
    """
    out = Path(out_dir)
    run = _run_folder(Path(src)).resolve()
    target = out.resolve()
    if target == run or target in run.parents:
        raise CheckpointError(f"{out_dir}: is {'the run folder' if target == run else 'a folder above the run'} of "
                              f"{src}; export into a new folder (e.g. {run / 'export'})")
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder; export writes a folder")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot list the folder ({e.strerror})") from None
    if not entries:
        return False
    try:
        info = json.loads((out / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{out_dir}: not empty and not an earlier bertnmt export (it holds {entries[0]!r}"
                              f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}); "
                              "export into a new or empty folder")
    return True


def export_model(run_dir_or_checkpoint: str | Path, out_dir: str | Path, vocab: str | Path | None = None,
                 config: str | Path | None = None) -> Path:
    """Write an exported folder (see the module docstring) from a checkpoint or a run directory.

    The target is checked first (:func:`check_export_target`). The folder is written under a temporary
    name, every file fsynced with a normal file's mode, and renamed into place. An earlier export at
    ``out_dir`` is replaced; files in it that export did not write (an evaluation's output) are moved
    into the new folder, never deleted.
    """
    src = Path(run_dir_or_checkpoint)
    if src.is_dir() and is_export(src):
        raise CheckpointError(f"{src} is already an exported model")
    replace_old = check_export_target(src, out_dir)
    ckpt_path = find_checkpoint(src) if src.is_dir() else src
    ctx = checkpoint_context(ckpt_path, vocab, config)
    weights = {k: v.contiguous() for k, v in ctx.ckpt["model"].items()}
    stage = ckpt_path.parent.name if ckpt_path.parent.parent.name == "checkpoints" else None
    info = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "bertnmt": __version__,
        "source_checkpoint": str(ckpt_path.resolve()), "stage": stage,
        "epoch": ctx.ckpt.get("epoch"), "step": ctx.ckpt.get("step"), "valid_metric": ctx.ckpt.get("metric"),
        "averaged_from": ctx.meta.get("averaged_from"),
        "encoder": encoder_info(ctx.cfg, ctx.meta, weights),
        "vocab": {"file": VOCAB, "sha256": _sha256(ctx.vocab_path), "size": len(SubwordVocab(ctx.vocab_path))},
        "files": list(REQUIRED),
    }
    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(out)
        tmp.mkdir()
    except OSError as e:
        raise write_error(out, e) from None
    try:
        from safetensors.torch import save_file

        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "bertnmt_export": str(EXPORT_VERSION)})
        OmegaConf.save(OmegaConf.structured(ctx.cfg), tmp / CONFIG)
        shutil.copyfile(ctx.vocab_path, tmp / VOCAB)
        (tmp / INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        mode = 0o666 & ~_umask()  # safetensors writes 0600; an export is meant to be shared
        for name in REQUIRED:
            os.chmod(tmp / name, mode)
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if replace_old:
            _replace_export(tmp, out)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s stage) to %s", ckpt_path, stage or "?", out)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_export(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` in the place of the earlier export ``out``.

    The earlier export is renamed aside; the files export did not write are moved into the new
    folder; then only export's own files are deleted and the emptied folder removed (``rmdir``
    fails rather than delete anything else). A crash midway leaves the user's files in
    ``.old-<name>.*`` beside ``out``.
    """
    old = out.with_name(f".old-{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    kept = sorted(p.name for p in old.iterdir() if p.name not in REQUIRED)
    for name in kept:
        os.rename(old / name, out / name)
    for name in REQUIRED:
        (old / name).unlink(missing_ok=True)
    old.rmdir()
    if kept:
        log.warning("kept %d file(s) of the earlier export in %s (%s): they describe the earlier model",
                    len(kept), out, ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else ""))
