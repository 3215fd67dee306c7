"""Generation: greedy and beam search over a whole padded batch at once, with a static KV cache.

The encoder runs once; each decoder layer's cross-attention keys and values are computed once; each step feeds one
token per row and appends its keys and values to the cache. Tokens are scored in float32, as transformers does, and
beam search follows transformers' (>= 4.50) vectorized algorithm step for step, so rows come out identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import T5, KVCache, padding_mask

NEG = -1.0e9  # transformers' "impossible" beam score: added, not assigned, so the arithmetic matches


def check_generate_args(max_new_tokens, min_new_tokens, num_beams, num_return_sequences, early_stopping):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}); "
                         "greedy decoding returns one sequence per input")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


@torch.inference_mode()
def generate(model: T5, input_ids, attention_mask=None, *, max_new_tokens: int, min_new_tokens: int = 0,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             num_return_sequences: int = 1) -> torch.LongTensor:
    """Rows [batch * num_return_sequences, length]: the decoder start token, the generated tokens, </s> where the
    model ended, then padding. Same arguments and meaning as transformers' generate(do_sample=False)."""
    check_generate_args(max_new_tokens, min_new_tokens, num_beams, num_return_sequences, early_stopping)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    encoded = model.encode(input_ids, attention_mask)
    step, cache = decoder_steps(model, encoded, attention_mask, num_beams, max_new_tokens + 1)
    cfg = model.config
    if num_beams == 1:
        return greedy(step, input_ids.shape[0], cfg, max_new_tokens, min_new_tokens, input_ids.device)
    return beam_search(step, cache, input_ids.shape[0], cfg, max_new_tokens, min_new_tokens, num_beams,
                       length_penalty, early_stopping, num_return_sequences, input_ids.device)


def decoder_steps(model: T5, encoded, attention_mask, copies: int, max_len: int):
    """A function step(tokens (N,), pos) -> float32 logits (N, vocab) for N = batch * copies rows (beams of an input
    are adjacent), and the KVCache it fills."""
    cross_kv = model.decoder.project(encoded)
    cross_mask = padding_mask(attention_mask, encoded.dtype)
    if copies > 1:
        cross_kv = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in cross_kv]
        cross_mask = cross_mask.repeat_interleave(copies, 0)
    bias = model.decoder.causal_bias(max_len)  # (1, H, max_len, max_len); step pos uses row pos
    cache = KVCache(model.config, encoded.shape[0] * copies, max_len, encoded.dtype, encoded.device)

    def step(tokens, pos: int):
        x = model.shared(tokens[:, None])  # (N, 1, d_model)
        hidden = model.decoder(x, bias[:, :, pos:pos + 1, :pos + 1], cross_kv, cross_mask, cache, pos)
        return model.logits(hidden)[:, -1].float()

    return step, cache


def greedy(step, batch: int, cfg, max_new_tokens: int, min_new_tokens: int, device):
    tokens = torch.full((batch, max_new_tokens + 1), cfg.pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = cfg.decoder_start_token_id
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits = step(tokens[:, t], t)
        if t < min_new_tokens:
            logits[:, cfg.eos_token_id] = float("-inf")
        next_token = logits.argmax(-1).masked_fill(done, cfg.pad_token_id)
        tokens[:, t + 1] = next_token
        done |= next_token == cfg.eos_token_id
        if done.all():
            return tokens[:, :t + 2]
    return tokens


def _gather(x, index):
    """x[b, index[b, j], ...] for x (B, n, ...) and index (B, m)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


def beam_search(step, cache: KVCache, batch: int, cfg, max_new_tokens: int, min_new_tokens: int, num_beams: int,
                length_penalty: float, early_stopping, num_return_sequences: int, device):
    """Beam search as transformers runs it: at each step keep the 2*num_beams best continuations over all beams of
    an input; the best num_beams that did not end continue; those among the top num_beams that ended (</s> or the
    length limit) compete, scored sum(log p) / length**length_penalty, for the num_beams finished slots.
    early_stopping: True stops an input once num_beams hypotheses are finished; False stops when the best running
    beam, at its current length, cannot beat the worst finished one; "never" assumes it could grow to the limit."""
    B, nb, L = batch, num_beams, max_new_tokens + 1
    k = 2 * nb
    eos = cfg.eos_token_id
    # transformers fills unused positions with `pad_token_id or eos_token_id`: for T5 (pad 0) that is eos.
    fill = cfg.pad_token_id or eos
    running = torch.full((B, nb, L), fill, dtype=torch.long, device=device)
    running[:, :, 0] = cfg.decoder_start_token_id
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = NEG  # only the first beam is live at the start, so beams do not duplicate
    finished, finished_scores = running.clone(), torch.full((B, nb), NEG, device=device)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=device)  # generated tokens of each finished hypothesis
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    in_top_nb = torch.arange(k, device=device) < nb
    row_offset = torch.arange(B, device=device)[:, None] * nb

    for t in range(max_new_tokens):
        log_probs = F.log_softmax(step(running[:, :, t].reshape(-1), t), dim=-1)  # (B*nb, V)
        if t < min_new_tokens:
            log_probs[:, eos] = float("-inf")
        V = log_probs.shape[-1]
        scores = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        cand_scores, cand_index = scores.topk(k)  # (B, 2nb)
        parent, token = cand_index // V, cand_index % V
        cand = _gather(running, parent)
        cand[:, :, t + 1] = token
        stops = (token == eos) | (t + 2 >= L)

        # The best num_beams continuations that did not stop keep running.
        cand_running_scores = cand_scores + stops.float() * NEG
        keep = cand_running_scores.topk(nb).indices
        running, running_scores = _gather(cand, keep), _gather(cand_running_scores, keep)
        cache.reorder((_gather(parent, keep) + row_offset).view(-1), t + 1)

        # Candidates among the top num_beams that stopped enter the finished set if they beat its worst member.
        just_finished = stops & in_top_nb
        s = cand_scores / ((t + 1) ** length_penalty)
        s += (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
        s += (~improvable).float() * NEG
        s += (~just_finished) * NEG
        merged = torch.cat((finished_scores, s), dim=1)
        top = merged.topk(nb).indices
        finished = _gather(torch.cat((finished, cand), dim=1), top)
        finished_scores = _gather(merged, top)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), top)
        finished_len = _gather(torch.cat((finished_len, torch.full_like(parent, t + 1)), dim=1), top)

        # Can a running beam still beat the worst finished hypothesis?
        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(stops.all()):
            break

    out = finished[:, :num_return_sequences].reshape(B * num_return_sequences, L)
    length = finished_len[:, :num_return_sequences].max()
    return out[:, :1 + int(length)]
