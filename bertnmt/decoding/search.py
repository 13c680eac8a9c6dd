"""Greedy and beam search (fairseq-style), batched and incremental, with their options.

The encoder (and BERT) run once per sentence. The static keys/values of every decoder layer's
encoder-decoder and BERT attention are computed once per sentence on B rows and shared by the
sentence's beams (never copied per beam, see ``DecoderState``); the self-attention caches follow
the beams. Decoding never emits pad, bos or unk.

The step loop never waits for the device: finished hypotheses are written into preallocated
tensors, and only every ``check_every`` steps does the host read which sentences are done and drop
them from the batch. A done sentence that is still in the batch keeps running, but its results are
frozen, so the output is the same as with a check at every step (only the work differs).

Length rule: a sentence of ``n`` source tokens (SentencePiece pieces plus eos) gets at most
``int(max_len_a * n + max_len_b)`` target tokens; at that length eos is forced. Before ``min_len``
tokens eos is banned (fairseq's ``--min-len``); the max length wins where the two disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bertnmt.core.errors import ConfigError
from bertnmt.model.decoder import DecoderState
from bertnmt.model.nmt import BertFusedTransformer

Hyps = list[tuple[list[int], float | None]]  # one sentence's hypotheses, best first: (token ids, score)


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode: search, length rule, batching and the special token ids."""

    beam: int = 5  # 1 = greedy (arg-max) search
    lenpen: float = 1.0  # beam score = sum of log-probs / (length incl. eos) ** lenpen
    max_len_a: float = 1.5  # at most int(max_len_a * source length + max_len_b) tokens
    max_len_b: int = 10
    min_len: int = 1  # eos is banned before this many tokens (1: never an empty hypothesis)
    nbest: int = 1  # hypotheses returned per sentence (beam search)
    # batching of decode_corpus: beam x padded source tokens per batch (0 = the device's default)
    max_tokens: int = 0
    max_sents: int = 0  # at most this many sentences per batch (0 = no cap)
    # steps between the host's reads of which sentences are done (0 = 8 on CUDA, where a read stalls the
    # device queue; 1 on the CPU, where it costs nothing and dropping done sentences at once saves work)
    check_every: int = 0
    precision: str = "auto"  # autocast: auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp32
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ConfigError(f"beam={self.beam} must be at least 1")
        if not 1 <= self.nbest <= self.beam:
            raise ConfigError(f"nbest={self.nbest} must be between 1 and the beam size ({self.beam})")
        for key in ("min_len", "max_tokens", "max_sents"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must not be negative")
        if self.check_every < 0:
            raise ConfigError(f"check_every={self.check_every} must not be negative")


def max_lengths(src: Tensor, opts: DecodeOptions) -> Tensor:
    """Per sentence the most target tokens (without eos): ``int(max_len_a * n + max_len_b)``, n = non-pad
    source tokens; (B,) long, at least 0."""
    n = src.ne(opts.pad_id).sum(dim=1).double()  # (B,)
    return (n * opts.max_len_a + opts.max_len_b).trunc().clamp(min=0).long()


def _next_logits(model: BertFusedTransformer, last: Tensor, state: DecoderState) -> Tensor:
    """One incremental decoder step: fp32 logits of the next token (N, V)."""
    return model.decode(last.unsqueeze(1), None, state)[:, -1].float()


def _topk_rows(x: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` for (N, V) rows with V >> k, several times faster on CPU.

    Split each row into blocks and take the k blocks with the largest maxima: every one of
    the row's top k values lies in one of them (at most j - 1 blocks can hold a larger value
    than the j-th largest). Values equal those of ``torch.topk``; ties may pick other indices.
    """
    N, V = x.shape
    nb = V // block
    if nb <= 4 * k or x.device.type != "cpu":  # the two-level trick only pays on the CPU
        return x.topk(k, dim=1)
    main = x[:, : nb * block].view(N, nb, block)
    blocks = main.amax(dim=2).topk(k, dim=1).indices  # (N, k)
    cand = main.gather(1, blocks.unsqueeze(2).expand(N, k, block)).view(N, k * block)
    idx = (blocks.unsqueeze(2) * block + torch.arange(block, device=x.device)).view(N, k * block)
    if nb * block < V:  # the ragged tail is always a candidate
        cand = torch.cat([cand, x[:, nb * block :]], dim=1)
        tail = torch.arange(nb * block, V, device=x.device).expand(N, -1)
        idx = torch.cat([idx, tail], dim=1)
    values, pos = cand.topk(k, dim=1)
    return values, idx.gather(1, pos)


def _banned(opts: DecodeOptions, device: torch.device) -> Tensor:
    """The ids never emitted (pad, bos, unk), on the device once per batch."""
    return torch.tensor([opts.pad_id, opts.bos_id, opts.unk_id], device=device)


def _ban(logits: Tensor, banned: Tensor, step: int, opts: DecodeOptions) -> None:
    """No pad, bos or unk; no eos before ``min_len`` tokens. In place on (N, V) logits."""
    logits.index_fill_(1, banned, float("-inf"))
    if step < opts.min_len:
        logits[:, opts.eos_id] = float("-inf")


def check_interval(opts: DecodeOptions, device: torch.device) -> int:
    """Steps between checks for done sentences: ``opts.check_every``, or by device when it is 0."""
    return opts.check_every or (8 if device.type == "cuda" else 1)


@torch.inference_mode()
def greedy_search(
    model: BertFusedTransformer,
    src: Tensor,  # (B, S)
    enc_ids: Tensor | None = None,  # (B, E)
    enc_mask: Tensor | None = None,  # (B, E)
    opts: DecodeOptions = DecodeOptions(beam=1),
    bert_out: tuple[Tensor, Tensor] | None = None,
) -> list[list[int]]:
    """Arg-max decoding; per sentence the token ids without bos/eos (``opts.beam`` is ignored)."""
    was_training = model.training
    model.eval()
    dev, B = src.device, src.size(0)
    max_lens = max_lengths(src, opts)  # (B,)
    last_step = int(max_lens.max())  # every sentence is done after this step (one read per batch)
    state = model.init_decoder_state(model.encode(src, enc_ids, enc_mask, bert_out))
    out = torch.full((B, last_step + 1), opts.pad_id, dtype=torch.long, device=dev)  # (B, T) by original index
    out_len = torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
    active = torch.arange(B, device=dev)  # (Ba,) original index of each row in the batch
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # (Ba,)
    last = torch.full((B,), opts.bos_id, dtype=torch.long, device=dev)  # (Ba,)
    banned = _banned(opts, dev)
    every = check_interval(opts, dev)
    step = 0
    while True:
        logits = _next_logits(model, last, state)  # (Ba, V)
        _ban(logits, banned, step, opts)
        last = logits.argmax(dim=-1)  # (Ba,)
        last = torch.where(max_lens[active] <= step, opts.eos_id, last)  # max length reached: eos
        is_eos = last.eq(opts.eos_id)
        out[active, step] = torch.where(done | is_eos, opts.pad_id, last)
        out_len[active] = torch.where(is_eos & ~done, step, out_len[active])
        done = done | is_eos
        step += 1
        if step % every == 0 or step > last_step:
            keep = (~done).nonzero().squeeze(1)  # (Ba',) the one read of device data
            if keep.numel() == 0:
                break
            if keep.numel() < done.numel():
                active, last, done = active[keep], last[keep], done[keep]
                state.select(keep)
    model.train(was_training)
    out, out_len = out.tolist(), out_len.tolist()
    return [row[:n] for row, n in zip(out, out_len)]


@torch.inference_mode()
def beam_search(
    model: BertFusedTransformer,
    src: Tensor,  # (B, S)
    enc_ids: Tensor | None = None,  # (B, E)
    enc_mask: Tensor | None = None,  # (B, E)
    opts: DecodeOptions = DecodeOptions(),
    bert_out: tuple[Tensor, Tensor] | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Beam search; per sentence the ``opts.nbest`` best (token ids without bos/eos, score), best first.

    score = sum of log-probs / (length incl. eos) ** lenpen. Each step looks at the top
    ``2 * beam`` extensions of a sentence: eos among its top ``beam`` finalise a hypothesis, the
    best ``beam`` non-eos extensions continue. A sentence is done with ``beam`` finished
    hypotheses, or at its max length, where eos is forced (with its own log-prob, as in fairseq).
    """
    was_training = model.training
    model.eval()
    dev = src.device
    B, K, eos = src.size(0), opts.beam, opts.eos_id
    max_lens = max_lengths(src, opts)  # (B,)
    last_step = int(max_lens.max())  # every sentence is done after this step (one read per batch)
    T = last_step + 1  # room for the longest hypothesis
    state = model.init_decoder_state(model.encode(src, enc_ids, enc_mask, bert_out))  # B rows
    state.expand(K)  # B * K decoder rows; the static K/V stay at B rows, shared by the beams

    # live batch (Ba sentences, Ba * K rows)
    active = torch.arange(B, device=dev)  # (Ba,) original index of each live sentence
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # (Ba,)
    tokens = torch.full((B * K, T + 1), opts.pad_id, dtype=torch.long, device=dev)  # (Ba * K, T + 1) bos + tokens
    tokens[:, 0] = opts.bos_id
    scores = torch.zeros(B, K, device=dev)  # (Ba, K) cumulative log-probs
    scores[:, 1:] = float("-inf")  # at step 0 all beams are the same: expand beam 0 only
    # finished hypotheses by original index, in the order found; slot K takes the writes that are dropped
    fin_tok = torch.full((B, K + 1, T), opts.pad_id, dtype=torch.long, device=dev)  # (B, K + 1, T)
    fin_len = torch.zeros(B, K + 1, dtype=torch.long, device=dev)
    fin_score = torch.full((B, K + 1), float("-inf"), device=dev)  # cumulative log-prob incl. eos
    fin_n = torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
    cand_rank = torch.arange(2 * K, device=dev)  # (2K,)
    banned = _banned(opts, dev)
    every = check_interval(opts, dev)
    step = 0
    while True:
        Ba = active.numel()
        logits = _next_logits(model, tokens[:, step], state)  # (Ba * K, V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (Ba * K, 1)
        eos_lp = logits[:, eos] - lse[:, 0]  # (Ba * K,) before any ban: the forced eos's log-prob
        _ban(logits, banned, step, opts)
        # Any of the global top 2K extensions of a sentence is among its beam's top 2K tokens.
        k2 = min(2 * K, logits.size(1))
        top_lp, top_tok = _topk_rows(logits, k2)  # (Ba * K, k2)
        top_lp = top_lp - lse  # log-probs
        at_max = max_lens[active] <= step  # (Ba,)
        force = at_max.repeat_interleave(K).unsqueeze(1)  # (Ba * K, 1): only eos, in column 0
        first = torch.arange(k2, device=dev).eq(0)  # (k2,)
        top_lp = torch.where(force, torch.where(first, eos_lp.unsqueeze(1), float("-inf")), top_lp)
        top_tok = torch.where(force & first, eos, top_tok)
        cand = (scores.unsqueeze(2) + top_lp.view(Ba, K, k2)).view(Ba, K * k2)
        cand_scores, cand_pos = cand.topk(2 * K, dim=1)  # (Ba, 2K)
        cand_beam = cand_pos // k2
        cand_tok = top_tok.view(Ba, K * k2).gather(1, cand_pos)
        rows_of = torch.arange(Ba, device=dev).unsqueeze(1) * K  # (Ba, 1) first row of each sentence

        # 1. finalise eos among the top K candidates, in rank order, into the sentence's free slots
        is_eos = cand_tok.eq(eos) & torch.isfinite(cand_scores)  # (Ba, 2K)
        fin = is_eos[:, :K] & ~done.unsqueeze(1)  # (Ba, K) a done sentence's results are frozen
        slot = fin_n[active].unsqueeze(1) + fin.long().cumsum(dim=1) - 1  # (Ba, K)
        slot = torch.where(fin & (slot < K), slot, K)
        sent = active.unsqueeze(1).expand(Ba, K)
        src_rows = (rows_of + cand_beam[:, :K]).view(-1)  # (Ba * K,)
        fin_tok[sent, slot] = tokens.index_select(0, src_rows)[:, 1:].view(Ba, K, T)
        fin_len[sent, slot] = step
        fin_score[sent, slot] = cand_scores[:, :K]
        fin_n[active] = (fin_n[active] + fin.sum(dim=1)).clamp(max=K)
        done = done | at_max | fin_n[active].ge(K)

        # 2. continue with the best K non-eos candidates (rank order)
        pick = (is_eos.long() * 2 * K + cand_rank).topk(K, dim=1, largest=False).indices  # (Ba, K)
        new_tok = cand_tok.gather(1, pick)  # (Ba, K)
        scores = cand_scores.gather(1, pick)
        rows = (rows_of + cand_beam.gather(1, pick)).view(-1)  # (Ba * K,)
        step += 1
        if step % every == 0 or step > last_step:  # drop done sentences from every tensor and the decoder state
            keep = (~done).nonzero().squeeze(1)  # (Ba',) the one read of device data
            if keep.numel() == 0:
                break
            if keep.numel() < Ba:
                rows = rows.view(Ba, K)[keep].view(-1)
                new_tok, scores, active, done = new_tok[keep], scores[keep], active[keep], done[keep]
                state.select(rows)
            else:
                state.reorder_beams(rows)
        else:
            state.reorder_beams(rows)  # beams move within their sentence; no check, no read
        tokens = tokens.index_select(0, rows)
        tokens[:, step] = new_tok.view(-1)

    model.train(was_training)
    fin_n, fin_len, fin_score, fin_tok = fin_n.tolist(), fin_len.tolist(), fin_score.tolist(), fin_tok.tolist()
    out = []
    for b in range(B):
        hyps = [(fin_tok[b][s][: fin_len[b][s]], fin_score[b][s] / float(fin_len[b][s] + 1) ** opts.lenpen)
                for s in range(fin_n[b])]
        out.append(sorted(hyps, key=lambda h: -h[1])[: opts.nbest])
    return out


def search(
    model: BertFusedTransformer,
    src: Tensor,  # (B, S)
    enc_ids: Tensor | None,  # (B, E)
    enc_mask: Tensor | None,  # (B, E)
    opts: DecodeOptions,
    bert_out: tuple[Tensor, Tensor] | None = None,
) -> list[Hyps]:
    """Greedy search when ``opts.beam == 1`` (score None), else beam search; per sentence its hypotheses."""
    if opts.beam == 1:
        return [[(ids, None)] for ids in greedy_search(model, src, enc_ids, enc_mask, opts, bert_out)]
    return beam_search(model, src, enc_ids, enc_mask, opts, bert_out)
