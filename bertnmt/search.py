"""Greedy and beam search (fairseq-style), batched and incremental.

The encoder (and BERT) run once per sentence. The static keys/values of every decoder layer's
encoder-decoder and BERT attention are computed once per sentence on B rows and shared by the
sentence's beams (never copied per beam, see ``DecoderState``); the self-attention caches follow
the beams; finished sentences leave the batch. Decoding never emits pad, bos or unk.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bertnmt.model.decoder import DecoderState
from bertnmt.model.nmt import BertFusedTransformer


def _max_lens(src: Tensor, pad_id: int, max_len_a: float, max_len_b: int) -> Tensor:
    src_len = src.ne(pad_id).sum(dim=1)  # (B,)
    return torch.tensor([int(max_len_a * n + max_len_b) for n in src_len.tolist()], device=src.device)


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
    if nb <= 4 * k:
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


@torch.inference_mode()
def greedy_search(
    model: BertFusedTransformer,
    src: Tensor,
    enc_ids: Tensor | None = None,
    enc_mask: Tensor | None = None,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    bert_out: tuple[Tensor, Tensor] | None = None,
    *,
    pad_id: int = 0,
    unk_id: int = 1,
    bos_id: int = 2,
    eos_id: int = 3,
) -> list[list[int]]:
    """Arg-max decoding; per sentence the token ids without bos/eos."""
    was_training = model.training
    model.eval()
    B = src.size(0)
    max_lens = _max_lens(src, pad_id, max_len_a, max_len_b)  # (B,)
    state = model.init_decoder_state(model.encode(src, enc_ids, enc_mask, bert_out))
    active = torch.arange(B, device=src.device)  # original index of each live row
    last = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    out: list[list[int]] = [[] for _ in range(B)]
    banned = [pad_id, bos_id, unk_id]
    step = 0
    while active.numel() > 0:
        logits = _next_logits(model, last, state)  # (N, V)
        logits[:, banned] = float("-inf")
        last = logits.argmax(dim=-1)  # (N,)
        last[max_lens[active] <= step] = eos_id  # reached max length: eos
        done = last.eq(eos_id)
        for i, tok in zip(active.tolist(), last.tolist()):
            if tok != eos_id:
                out[i].append(tok)
        step += 1
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            active, last = active[keep], last[keep]
            if keep.numel() > 0:
                state.select(keep)
    model.train(was_training)
    return out


@torch.inference_mode()
def beam_search(
    model: BertFusedTransformer,
    src: Tensor,
    enc_ids: Tensor | None = None,
    enc_mask: Tensor | None = None,
    beam: int = 5,
    lenpen: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    nbest: int = 1,
    bert_out: tuple[Tensor, Tensor] | None = None,
    min_len: int = 0,
    *,
    pad_id: int = 0,
    unk_id: int = 1,
    bos_id: int = 2,
    eos_id: int = 3,
) -> list[list[tuple[list[int], float]]]:
    """Beam search; per sentence the ``nbest`` best (token ids without bos/eos, score), best first.

    score = sum of log-probs / (length incl. eos) ** lenpen. Each step looks at the top
    ``2 * beam`` extensions of a sentence: eos among its top ``beam`` finalise a hypothesis, the
    best ``beam`` non-eos extensions continue. A sentence is done with ``beam`` finished
    hypotheses; at its max length ``int(max_len_a * src_len + max_len_b)`` eos is forced. Before
    ``min_len`` tokens eos is banned (fairseq's ``--min-len``).
    """
    was_training = model.training
    model.eval()
    dev = src.device
    B, K = src.size(0), beam
    max_lens = _max_lens(src, pad_id, max_len_a, max_len_b)  # (B,)
    state = model.init_decoder_state(model.encode(src, enc_ids, enc_mask, bert_out))  # B rows
    state.expand(K)  # B * K decoder rows; the static K/V stay at B rows, shared by the beams

    active = torch.arange(B, device=dev)  # (Ba,) original index of each live sentence
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=dev)  # (Ba * K, t + 1)
    scores = torch.zeros(B, K, device=dev)  # (Ba, K) cumulative log-probs
    scores[:, 1:] = float("-inf")  # at step 0 all beams are the same: expand beam 0 only
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    banned = [pad_id, bos_id, unk_id]
    cand_rank = torch.arange(2 * K, device=dev)  # (2K,)
    step = 0
    while active.numel() > 0:
        Ba = active.numel()
        logits = _next_logits(model, tokens[:, -1], state)  # (Ba * K, V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (Ba * K, 1)
        logits[:, banned] = float("-inf")
        if step < min_len:
            logits[:, eos_id] = float("-inf")
        # Any of the global top 2K extensions of a sentence is among its beam's top 2K tokens.
        top_lp, top_tok = _topk_rows(logits, min(2 * K, logits.size(1)))  # (Ba * K, k2)
        top_lp = top_lp - lse  # log-probs
        at_max = max_lens[active] <= step  # (Ba,)
        if at_max.any():  # force eos, with its own log-prob (fairseq)
            force = at_max.repeat_interleave(K)
            eos_lp = logits[force, eos_id] - lse[force, 0]
            top_lp[force] = float("-inf")
            top_lp[force, 0], top_tok[force, 0] = eos_lp, eos_id
        k2 = top_lp.size(1)
        cand = (scores.unsqueeze(2) + top_lp.view(Ba, K, k2)).view(Ba, K * k2)
        cand_scores, cand_pos = cand.topk(2 * K, dim=1)  # (Ba, 2K)
        cand_beam = cand_pos // k2
        cand_tok = top_tok.view(Ba, K * k2).gather(1, cand_pos)

        # 1. finalise eos among the top K candidates
        is_eos = cand_tok.eq(eos_id) & torch.isfinite(cand_scores)  # (Ba, 2K)
        fin = is_eos[:, :K]
        if fin.any():
            norm = float(step + 1) ** lenpen  # length incl. eos
            for i, j in fin.nonzero().tolist():
                hyps = finished[active[i].item()]
                if len(hyps) < K:
                    row = i * K + cand_beam[i, j].item()
                    hyps.append((tokens[row, 1:].tolist(), cand_scores[i, j].item() / norm))
        done = at_max.clone()
        for i, orig in enumerate(active.tolist()):
            if len(finished[orig]) >= K:
                done[i] = True

        # 2. continue with the best K non-eos candidates (rank order)
        pick = (is_eos.long() * 2 * K + cand_rank).topk(K, dim=1, largest=False).indices  # (Ba, K)
        new_beam = cand_beam.gather(1, pick)  # (Ba, K)
        new_tok = cand_tok.gather(1, pick)
        new_scores = cand_scores.gather(1, pick)
        rows = (torch.arange(Ba, device=dev).unsqueeze(1) * K + new_beam).view(-1)  # (Ba * K,)
        step += 1

        if done.any():  # drop finished sentences from every tensor and the decoder state
            keep = (~done).nonzero().squeeze(1)  # (Ba',)
            if keep.numel() == 0:
                break
            rows = rows.view(Ba, K)[keep].view(-1)
            new_tok, new_scores, active = new_tok[keep], new_scores[keep], active[keep]
        state.select(rows)  # beams move within their sentence; finished sentences leave
        tokens = torch.cat([tokens.index_select(0, rows), new_tok.view(-1, 1)], dim=1)
        scores = new_scores

    model.train(was_training)
    return [sorted(h, key=lambda x: -x[1])[:nbest] for h in finished]
