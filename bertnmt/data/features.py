"""The frozen-encoder feature cache: H_B computed once per sentence, reused every epoch.

While the pretrained encoder is frozen it runs in eval mode (no dropout), so its output for a
sentence never changes. Computing it at every step of every epoch is the largest avoidable cost
of BERT-fused training (the official code does it, with dropout on). Here it is computed once,
stored in fp16 and memory-mapped::

    <data dir>/features-<key>/<split>.npy          (N_tokens, Hb) float16, all sentences back to back
    <data dir>/features-<key>/<split>.offsets.npy  (N + 1,) int64: sentence i is rows offsets[i]:offsets[i+1]
    <data dir>/features-<key>/meta.json            settings and each file's sha256, checked before serving

``key`` hashes the encoder's weights, the layer, the encoder ids of every split and the dtype; the
data folder itself is keyed by the corpus and its settings. Whether cached features may be served
at a given step is the freeze policy's decision (:meth:`bertnmt.train.freeze.FreezePolicy.encoder_untrained`):
never while, or after, any part of the encoder trains.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bertnmt.core.atomic import atomic_dir, remove_stale_temps, temp_name
from bertnmt.data.prepare import PreparedData, Split
from bertnmt.core.errors import ConfigError

log = logging.getLogger(__name__)

FEATURES_VERSION = 2  # 2: meta.json holds each file's sha256
DTYPE = np.float16


@dataclass
class FeatureStore:
    """H_B of one split: sentence ``i`` is ``values[offsets[i]:offsets[i+1]]`` (E_i, Hb), fp16.

    Pages of a memory map that were read count in the process's resident set until unmapped, so a
    whole epoch would add the full cache to the reported peak memory although the pages are clean and
    shared with the OS page cache. Every ``release_bytes`` served, :meth:`release` drops them from this
    process (the next read maps them again from the page cache, a minor fault).
    """

    values: np.ndarray  # (N_tokens, Hb) float16, usually a read-only memmap
    offsets: np.ndarray  # (N + 1,) int64
    release_bytes: int = 64 * 2**20
    _served: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def hidden_size(self) -> int:
        return int(self.values.shape[1])

    def get(self, i: int) -> np.ndarray:
        out = np.array(self.values[self.offsets[i] : self.offsets[i + 1]])  # (E_i, Hb), copied out of the map
        self._served += out.nbytes
        if self._served >= self.release_bytes:
            self.release()
        return out

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache)."""
        mm = getattr(self.values, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)
        self._served = 0


def pad_features(feats: list[np.ndarray], width: int = 0) -> Tensor:
    """Right-pad per-sentence features into one (B, E, Hb) fp16 tensor (zeros at the padding), E >= ``width``."""
    width = max(width, max(len(f) for f in feats))
    out = np.zeros((len(feats), width, feats[0].shape[1]), dtype=DTYPE)  # (B, E, Hb)
    for row, f in enumerate(feats):
        out[row, : len(f)] = f
    return torch.from_numpy(out)


def estimate_bytes(splits: dict[str, Split], hidden_size: int) -> int:
    """Disk size of the cache: every encoder token of every split times ``hidden_size`` fp16 values."""
    tokens = sum(sum(len(e) for e in s.enc_ids) for s in splits.values() if s.enc_ids is not None)
    return tokens * hidden_size * np.dtype(DTYPE).itemsize


def feature_key(encoder_sha256: str, layer: Any, splits: dict[str, Split]) -> str:
    """What determines the cached values: encoder weights, layer, the encoder ids, dtype, version."""
    h = hashlib.sha256(json.dumps([FEATURES_VERSION, encoder_sha256, str(layer), np.dtype(DTYPE).str]).encode())
    for name in sorted(splits):
        enc = splits[name].enc_ids
        h.update(name.encode())
        if enc is not None:
            h.update(np.asarray([len(e) for e in enc], dtype=np.int64).tobytes())
            h.update(np.concatenate(enc).astype(np.int32).tobytes() if enc else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_split(encoder: torch.nn.Module, split: Split, enc_pad_id: int, out: Path, device: torch.device,
                  max_tokens: int = 4096) -> None:
    """Run the (frozen, eval-mode) encoder over ``split`` in length-sorted batches; write ``out``.npy/.offsets.npy."""
    enc = split.enc_ids
    assert enc is not None
    lengths = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    hidden = int(encoder.hidden_size)
    values = np.lib.format.open_memmap(out.with_suffix(".npy"), mode="w+", dtype=DTYPE,
                                       shape=(int(offsets[-1]), hidden))  # (N_tokens, Hb)
    with open(out.with_suffix(".npy"), "r+b") as f:  # reserve the blocks: a full disk is an OSError here, not a
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)  # SIGBUS in a write to the memory map
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):  # batches of at most max_tokens padded tokens
        width = int(lengths[order[start]])
        end = start
        while end < len(order) and (end - start + 1) * max(width, int(lengths[order[end]])) <= max_tokens:
            width = max(width, int(lengths[order[end]]))
            end += 1
        end = max(end, start + 1)
        idx = order[start:end]
        ids = torch.full((len(idx), width), enc_pad_id, dtype=torch.long)  # (B, E)
        for row, i in enumerate(idx):
            ids[row, : lengths[i]] = torch.from_numpy(enc[i].astype(np.int64))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[idx])[:, None]).long()  # (B, E)
        h = encoder(ids.to(device), mask.to(device)).float().cpu().numpy().astype(DTYPE)  # (B, E, Hb)
        for row, i in enumerate(idx):
            values[offsets[i] : offsets[i + 1]] = h[row, : lengths[i]]
        start = end
    values.flush()
    del values
    np.save(out.with_suffix(".offsets.npy"), offsets, allow_pickle=False)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder: Path) -> str | None:
    """Why the cache in ``folder`` must not be served (a file missing or failing its checksum), or None.

    A damaged file of the same size would otherwise be served as features without any error."""
    try:
        sums = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["sha256"]
        for name, expected in sums.items():
            if _sha256(folder / name) != expected:
                return f"{name} fails its sha256 checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _discard(folder: Path) -> None:
    """Move a damaged cache out of the way (readers that mapped it keep their pages), then delete it."""
    aside = temp_name(folder)
    try:
        os.rename(folder, aside)
    except OSError:
        return  # another process moved or rebuilt it meanwhile
    shutil.rmtree(aside, ignore_errors=True)


def load_store(folder: Path, name: str) -> FeatureStore:
    values = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(folder / f"{name}.offsets.npy", allow_pickle=False)
    if values.ndim != 2 or offsets[-1] != values.shape[0]:
        raise ValueError(f"{folder / name}.npy and its offsets do not match")
    return FeatureStore(values, offsets)


def feature_cache(encoder: torch.nn.Module, data: PreparedData, encoder_sha256: str, enc_pad_id: int,
                  device: torch.device, budget_gb: float, mode: str = "auto",
                  frozen: bool = True) -> dict[str, FeatureStore] | None:
    """The cached H_B of every split, built now if needed; None (on-the-fly features) when off or too big.

    ``frozen``: the freeze policy's word that the encoder has not trained so far
    (:meth:`~bertnmt.train.freeze.FreezePolicy.encoder_untrained`). The encoder is put in eval mode
    while computing, as the policy holds it in training. The decision is logged in one line.
    """
    if mode not in ("auto", "off"):
        raise ConfigError(f"bert.cache_features={mode!r}: expected 'auto' or 'off'")
    if mode == "off":
        log.info("feature cache: off (bert.cache_features=off); H_B is computed on the fly")
        return None
    if not frozen:
        log.info("feature cache: not used, the pretrained encoder trains from the start; H_B is computed on the fly")
        return None
    splits = {n: s for n, s in data.splits.items() if s.enc_ids is not None}
    size = estimate_bytes(splits, int(encoder.hidden_size))
    # what the encoder's forward returns: its layer, or the random control's vectors (bertnmt.model.pretrained)
    what_out = (f"layer={getattr(encoder, 'layer', -1)}|random_features={getattr(encoder, 'random_features', False)}"
                f"|seed={getattr(encoder, 'random_seed', 0)}")
    folder = data.dir / f"features-{feature_key(encoder_sha256, what_out, splits)}"
    n_sent = sum(len(s) for s in splits.values())
    what = f"{n_sent:,} sentences x {int(encoder.hidden_size)} fp16 = {size / 2**20:,.0f} MB"
    remove_stale_temps(data.dir)
    if folder.is_dir() and (bad := verify(folder)) is not None:
        log.warning("feature cache: %s is damaged (%s); building it again", folder, bad)
        _discard(folder)
    if not folder.is_dir():
        free = shutil.disk_usage(data.dir).free
        if size > budget_gb * 2**30 or size > 0.9 * free:
            log.info("feature cache: not used, %s exceeds the budget bert.cache_budget_gb=%g (free disk %.1f GB); "
                     "H_B is computed on the fly", what, budget_gb, free / 2**30)
            return None
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            with atomic_dir(folder) as tmp:
                for name, split in splits.items():
                    compute_split(encoder, split, enc_pad_id, tmp / name, device)
                sums = {p.name: _sha256(p) for p in sorted(tmp.glob("*.npy"))}
                (tmp / "meta.json").write_text(json.dumps({
                    "version": FEATURES_VERSION, "encoder_sha256": encoder_sha256,
                    "layer": str(getattr(encoder, "layer", -1)), "bytes": size,
                    "splits": {n: len(s) for n, s in splits.items()}, "sha256": sums}, indent=2))
        finally:
            encoder.train(was_training)
        log.info("feature cache: built %s in %.1f s: %s", what, time.perf_counter() - start, folder)
    else:
        log.info("feature cache: reusing %s: %s", what, folder)
    try:
        return {name: load_store(folder, name) for name in splits}
    except (OSError, ValueError) as e:
        log.warning("feature cache: %s is unreadable (%s); H_B is computed on the fly (delete it to rebuild)", folder, e)
        return None
