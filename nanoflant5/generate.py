"""Generation: greedy, sampling and beam search over a whole padded batch at once, with a static KV cache.

The encoder runs once; each decoder layer's cross-attention keys and values are computed once; each step feeds one
token per row and writes its keys and values into the cache. Tokens are scored in float32, logits are processed in
transformers' order (sequence bias, repetition penalty, n-gram blocking, bad words, minimum length, suppressed
tokens, then temperature, top-k, top-p, min-p, typical, epsilon and eta cutoffs when sampling), and beam search
follows transformers' (>= 4.50) vectorized algorithm step for step, so deterministic settings give transformers'
rows exactly, and sampling draws the same tokens from the same random stream.
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .model import T5, KVCache, padding_mask
from .speed import Speedups, decoding, encode

NEG = -1.0e9  # transformers' "impossible" beam score: added, not assigned, so the arithmetic matches
# Steps between checks of "all rows finished?" (each check waits for the device). Decoding past the point where
# everything finished changes no output (greedy rows are trimmed, finished beams cannot be displaced), so on an
# accelerator the loop checks only every few steps and never stalls the queue in between.
CHECK_EVERY = {"cpu": 1, "default": 8}


def check_every(device) -> int:
    return CHECK_EVERY.get(torch.device(device).type, CHECK_EVERY["default"])


def process_scores(scores, tokens, t: int, g: GenerationConfig, eos: int, min_keep: int):
    """Transformers' logits processors, in its order, applied in place and returned. scores: float32 (N, vocab) for
    the token after `tokens` (N, t+1), the decoder tokens so far (start token included, as transformers counts
    them)."""
    if g.sequence_bias:  # each sequence's bias on its last token in rows that end with the rest of it, summed as
        groups = sequence_groups(g.biased_sequences(), scores.device)  # transformers sums it: single tokens first
        single = torch.zeros(scores.shape[-1], device=scores.device)
        for prefixes, last, values in groups:
            if prefixes.shape[1] == 0:
                single[last] = values
        bias = torch.zeros_like(scores)
        bias += single
        for prefixes, last, values in groups:
            if 0 < prefixes.shape[1] <= tokens.shape[1]:
                bias.index_add_(1, last, torch.where(ending_with(tokens, prefixes), values, 0.0).to(bias.dtype))
        scores.add_(bias)
    if g.repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019): make tokens already generated less likely
        seen = scores.gather(1, tokens)
        scores.scatter_(1, tokens, torch.where(seen < 0, seen * g.repetition_penalty, seen / g.repetition_penalty))
    n = g.no_repeat_ngram_size
    if n > 0 and t + 1 >= n:  # ban tokens that would repeat an n-gram: windows whose first n-1 tokens end the row
        windows = tokens.unfold(1, n, 1)  # (N, t+2-n, n)
        match = (windows[..., :-1] == tokens[:, t + 2 - n:].unsqueeze(1)).all(-1)
        ban(scores, torch.where(match, windows[..., -1], scores.shape[-1]))
    if g.bad_words_ids:  # ban each sequence's last token in rows that end with the rest of it
        bad = tuple((tuple(seq), 0.0) for seq in g.bad_words_ids if list(seq) != [eos])  # [eos]: transformers drops it
        for prefixes, last, _ in sequence_groups(bad, scores.device):
            if prefixes.shape[1] <= tokens.shape[1]:
                ban(scores, torch.where(ending_with(tokens, prefixes), last, scores.shape[-1]))
    if t < g.min_tokens:
        scores[:, eos] = float("-inf")
    for suppressed in (g.suppress_tokens, g.begin_suppress_tokens if t == 0 else None):
        if suppressed:
            scores.index_fill_(1, torch.tensor(suppressed, device=scores.device), float("-inf"))
    if g.do_sample:
        if g.temperature != 1.0:
            scores.div_(g.temperature)
        if g.top_k:
            kth = torch.topk(scores, max(min(g.top_k, scores.shape[-1]), min_keep))[0][..., -1, None]
            scores.masked_fill_(scores < kth, float("-inf"))
        if g.top_p < 1.0:  # nucleus (Holtzman et al. 2019): drop the least likely tokens holding 1 - top_p
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - g.top_p)
            drop[..., -min_keep:] = False
            scores.masked_fill_(drop.scatter(1, order, drop), float("-inf"))
        keep = min(min_keep, scores.shape[-1])
        if g.min_p is not None:  # min-p (Nguyen et al. 2024): drop tokens below min_p times the likeliest's probability
            probs = scores.softmax(-1)
            drop = probs < g.min_p * probs.amax(-1, keepdim=True)
            scores.masked_fill_(drop.scatter_(-1, probs.topk(keep).indices, False), float("-inf"))
        if g.typical_p < 1.0:  # typical sampling (Meister et al. 2022): keep the tokens whose surprisal is nearest the
            log_p = F.log_softmax(scores, dim=-1)  # entropy, up to typical_p of the probability
            entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)
            sorted_shift, order = torch.sort((-log_p - entropy).abs(), descending=False)
            last = (scores.gather(-1, order).softmax(-1).cumsum(-1) < g.typical_p).sum(1)
            drop = sorted_shift > sorted_shift.gather(1, last.clamp_(max=scores.shape[-1] - 1).view(-1, 1))
            drop[..., :min_keep] = False
            scores.masked_fill_(drop.scatter(1, order, drop), float("-inf"))
        for cutoff, eta in ((g.epsilon_cutoff, False), (g.eta_cutoff, True)):  # epsilon, eta sampling (Hewitt et
            if 0.0 < cutoff < 1.0:  # al. 2022): drop tokens less likely than the cutoff, or than eta
                floor = torch.tensor(cutoff, device=scores.device)  # float32, as transformers takes it
                if eta:  # eta = min(epsilon, sqrt(epsilon) exp(-entropy))
                    entropy = torch.distributions.Categorical(logits=scores).entropy()
                    floor = torch.min(floor, floor.sqrt() * torch.exp(-entropy))[..., None]
                drop = (scores.softmax(-1) < floor) & (scores < scores.topk(keep)[0][..., -1, None])
                scores.masked_fill_(drop, float("-inf"))
    return scores


def changes_scores(g: GenerationConfig, t: int) -> bool:
    """Whether process_scores changes anything for greedy decoding at step t (else it can be skipped)."""
    n = g.no_repeat_ngram_size
    return bool(g.sequence_bias or g.repetition_penalty != 1.0 or (n > 0 and t + 1 >= n) or g.bad_words_ids
                or t < g.min_tokens or g.suppress_tokens or (g.begin_suppress_tokens and t == 0))


def ban(scores, tokens):
    """scores[i, tokens[i, j]] = -inf in place, for tokens (N, k); the vocabulary size as a token bans nothing."""
    V = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, tokens, True)
    scores.masked_fill_(banned[:, :V], float("-inf"))


@lru_cache(maxsize=32)
def sequence_groups(sequences: tuple, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """((token ids), value) pairs grouped by length, in order of first appearance, as transformers' sequence bias and
    bad words processors group them: for each group, the prefixes (S, n) (n = 0: single tokens), last tokens (S,)
    and float32 values (S,)."""
    groups: dict[int, list] = {}
    for seq, value in sequences:
        groups.setdefault(len(seq) - 1, []).append((seq, value))
    return [(torch.tensor([seq[:-1] for seq, _ in group], dtype=torch.long, device=device).view(len(group), n),
             torch.tensor([seq[-1] for seq, _ in group], dtype=torch.long, device=device),
             torch.tensor([value for _, value in group], device=device)) for n, group in groups.items()]


def ending_with(tokens, prefixes):
    """(N, S): whether each row of tokens (N, t) ends with each prefix (S, n), for n <= t."""
    return (tokens[:, None, tokens.shape[1] - prefixes.shape[1]:] == prefixes).all(-1)


def prepare(model: T5, input_ids, attention_mask, seed, generator, kwargs):
    """The generation settings (checkpoint defaults, then kwargs), the attention mask, and the random stream
    (None: torch's global one, as transformers uses)."""
    g = model.generation_config.update(**kwargs)
    g.check()
    beyond = sorted(t for t in g.named_tokens() if t >= model.config.vocab_size)
    if beyond:
        raise ValueError(f"sequence_bias/bad_words_ids/suppress_tokens/begin_suppress_tokens name tokens beyond the "
                         f"vocabulary ({model.config.vocab_size}): {beyond}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    return g, attention_mask, generator


def generate(model: T5, input_ids, attention_mask=None, *, seed: int | None = None,
             generator: torch.Generator | None = None, return_scores: bool = False, compile: bool | None = None,
             **kwargs):
    """Rows [batch * num_return_sequences, length]: the decoder start token, the generated tokens, </s> where the
    model ended, then padding. Arguments as transformers' generate(): max_new_tokens, max_length, min_new_tokens,
    min_length, do_sample, num_beams, num_return_sequences, temperature, top_k, top_p, min_p, typical_p,
    epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size, sequence_bias, bad_words_ids,
    suppress_tokens, begin_suppress_tokens, length_penalty, early_stopping; defaults from the checkpoint's
    generation config.
    seed or generator makes sampling repeatable. return_scores=True also returns a float32 score per row: for beam
    search transformers' sequence score (sum of processed log-probabilities / length**length_penalty), otherwise
    the sum of the model's log-probabilities of the generated tokens (</s> included). compile=True runs the decoding
    step through torch.compile (speed.compiled_step): the first call of each kind compiles (9-60 s on CPU for
    flan-t5-small and base), and batched CPU decoding keeps its packed weights between calls (speed.fast_linears).
    compile=None (the default): eager until this model's eager decoding in this process has taken as long as
    compiling takes, then compiled (CPU; speed.compile_pays), except where the eager step runs each decoder block in
    one kernel call (float32 activations on CPU), which measured as fast as compiled or faster; compile=False:
    never."""
    with torch.inference_mode():
        g, attention_mask, rng = prepare(model, input_ids, attention_mask, seed, generator, kwargs)
        encoded = encode(model, input_ids, attention_mask)
        B = input_ids.shape[0]
        # copies of each input: its beams, or the sequences sampled from it (transformers repeats the input)
        copies = g.num_beams if g.num_beams > 1 else g.num_return_sequences
        with decoding(model, g, B * copies, encoded.dtype, compile, scores=return_scores) as fast:
            step, cache = decoder_steps(model, encoded, attention_mask, copies, g.new_tokens + 1, fast)
            if g.num_beams == 1:
                rows, scores = None, None
                for rows, scores in token_steps(step, fast, B * copies, model.config, g, rng, input_ids.device,
                                                check_every(input_ids.device), return_scores):
                    pass
                rows = trim(rows, model.config.eos_token_id)
            else:
                rows, scores = beam_search(step, fast, cache, B, model.config, g, rng, input_ids.device)
    # as plain tensors (inference tensors cannot enter autograd, e.g. model(..., decoder_input_ids=rows) for training)
    rows = rows.clone()
    return (rows, scores.clone()) if return_scores else rows


@torch.inference_mode()
def stream(model: T5, input_ids, attention_mask=None, *, seed=None, generator=None, compile: bool | None = None,
           **kwargs):
    """Greedy or sampled decoding that yields each step's new tokens, a LongTensor [batch] (padding for rows that
    already ended), as soon as they are chosen. The tokens are those generate() returns for the same arguments
    (compile as there)."""
    g, attention_mask, rng = prepare(model, input_ids, attention_mask, seed, generator, kwargs)
    if g.num_beams != 1 or g.num_return_sequences != 1:
        raise ValueError("streaming supports greedy decoding and sampling with one sequence per input")
    encoded = encode(model, input_ids, attention_mask)
    with decoding(model, g, input_ids.shape[0], encoded.dtype, compile) as fast:
        step, _ = decoder_steps(model, encoded, attention_mask, 1, g.new_tokens + 1, fast)
        for rows, _ in token_steps(step, fast, input_ids.shape[0], model.config, g, rng, input_ids.device):
            if rows.shape[1] > 1:
                yield rows[:, -1]


@torch.inference_mode()
def score(model: T5, input_ids, attention_mask, labels, labels_mask=None):
    """Teacher-forced scoring of target sequences: (sum of log p(label) per row, number of scored tokens per row).
    Labels of -100 (and, if given, positions where labels_mask is 0) are skipped, as in transformers' loss, whose
    mean cross-entropy equals -sum(sums) / sum(counts)."""
    keep = labels != -100
    if labels_mask is not None:
        keep &= labels_mask.bool()
    labels = labels.masked_fill(~keep, -100)
    logits = model(input_ids, attention_mask, labels=labels)
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    token = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~keep, 0.0)
    return token.sum(-1), keep.sum(-1)


def decoder_steps(model: T5, encoded, attention_mask, copies: int, max_len: int, fast: Speedups):
    """A function step(tokens (N,), pos) -> float32 logits (N, vocab) for N = batch * copies rows (the copies of an
    input are adjacent), and the KVCache it fills. With greedy decoding's int8 screen the step returns the screen's
    bounds instead of logits (fast.head), which fast.greedy turns into tokens; fast.compiled may compile the step."""
    cross_kv = model.decoder.project(encoded)  # one per input, shared by its copies (CrossAttention.forward)
    cross_mask = padding_mask(attention_mask, encoded.dtype)
    bias = model.decoder.causal_bias(max_len)  # (1, H, max_len, max_len); step pos uses row pos
    cache = KVCache(model.config, encoded.shape[0] * copies, max_len, encoded.dtype, encoded.device)

    def step(tokens, pos: int):
        return fast.head(decode(model, tokens, bias[:, :, pos:pos + 1, :pos + 1], cross_kv, cross_mask, cache, pos))

    return fast.compiled(step, encoded.device), cache


def decode(model: T5, tokens, bias, cross_kv, cross_mask, cache: KVCache, pos):
    """One decoding step of the decoder stack: the last hidden states (N, d_model) after feeding tokens (N,) at
    position pos (an int, or a LongTensor (N,) of per-row positions), with bias the causal bias's rows for them."""
    x = model.shared(tokens[:, None])  # (N, 1, d_model)
    return model.decoder(x, bias, cross_kv, cross_mask, cache, pos)[:, -1]


def next_tokens(out, tokens, t: int, g: GenerationConfig, eos: int, rng, fast: Speedups):
    """The next token (N,) of rows whose tokens so far are tokens[:, :t+1], from the step's output: sampled, or the
    greedy choice. Processes `out` in place."""
    process = partial(process_scores, tokens=tokens[:, :t + 1], t=t, g=g, eos=eos, min_keep=1)
    if g.do_sample:
        return torch.multinomial(F.softmax(process(out), dim=-1), 1, generator=rng).squeeze(1)
    return fast.greedy(out, process)


def trim(rows, eos: int):
    """Cut the columns decoded after every row had ended (see CHECK_EVERY): transformers stops at that step."""
    ended = rows[:, 1:] == eos
    if not bool(ended.any(1).all()):
        return rows
    return rows[:, :int(ended.float().argmax(1).max()) + 2]


def token_steps(step, fast: Speedups, N: int, cfg, g: GenerationConfig, rng, device, every: int = 1,
                want_scores: bool = False):
    """Greedy decoding or sampling, one token per row per step. Yields (rows so far, scores so far: None unless
    want_scores) after the start token and after every step; rows that ended get padding. Checks for the end every
    `every` steps."""
    tokens = torch.full((N, g.new_tokens + 1), cfg.pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = cfg.decoder_start_token_id
    done = torch.zeros(N, dtype=torch.bool, device=device)
    total = torch.zeros(N, device=device) if want_scores else None
    yield tokens[:, :1], total
    for t in range(g.new_tokens):
        out = step(tokens[:, t], t)  # logits (or, greedy, what fast.greedy takes: see decoder_steps)
        log_probs = F.log_softmax(out, dim=-1) if want_scores else None  # before next_tokens changes out in place
        next_token = next_tokens(out, tokens, t, g, cfg.eos_token_id, rng, fast).masked_fill(done, cfg.pad_token_id)
        if want_scores:
            total = total + log_probs.gather(1, next_token[:, None]).squeeze(1).masked_fill(done, 0.0)
        tokens[:, t + 1] = next_token
        done |= next_token == cfg.eos_token_id
        yield tokens[:, :t + 2], total
        if (t + 1) % every == 0 and done.all():
            return


def _gather(x, index):
    """x[b, index[b, j], ...] for x (B, n, ...) and index (B, m)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


def beam_search(step, fast: Speedups, cache: KVCache, batch: int, cfg, g: GenerationConfig, rng, device):
    """beam_steps run to the end: (rows, scores)."""
    steps = beam_steps(step, fast, cache, batch, cfg, g, rng, device)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def beam_steps(step, fast: Speedups, cache: KVCache, batch: int, cfg, g: GenerationConfig, rng, device):
    """Beam search, yielding (None) after each step and returning (rows, scores), as transformers runs it: at each
    step keep the 2*num_beams best continuations over all beams of an input (or, when sampling, 2*num_beams drawn
    without replacement); the best num_beams that did not end continue; those among the top num_beams that ended
    (</s> or the length limit) compete, scored sum(log p) / length**length_penalty, for the num_beams finished
    slots. early_stopping: True stops an input once num_beams hypotheses are finished; False stops when the best
    running beam, at its current length, cannot beat the worst finished one; "never" assumes it could grow to the
    length limit."""
    B, nb, L, lp = batch, g.num_beams, g.new_tokens + 1, g.length_penalty
    k = 2 * nb
    eos = cfg.eos_token_id
    every = check_every(device)
    # transformers fills unused positions with `pad_token_id or eos_token_id`: for T5 (pad 0) that is eos.
    fill = cfg.pad_token_id or eos
    running = torch.full((B, nb, L), fill, dtype=torch.long, device=device)
    running[:, :, 0] = cfg.decoder_start_token_id
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = NEG  # only the first beam is live at the start, so beams do not duplicate
    finished, finished_scores = running.clone(), torch.full((B, nb), NEG, device=device)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=device)  # generated tokens of each finished one
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    in_top_nb = torch.arange(k, device=device) < nb
    row_offset = torch.arange(B, device=device)[:, None] * nb

    for t in range(g.new_tokens):
        log_probs = F.log_softmax(step(running[:, :, t].reshape(-1), t), dim=-1)  # (B*nb, V)
        log_probs = process_scores(log_probs, running[:, :, :t + 1].reshape(B * nb, t + 1), t, g, eos, min_keep=2)
        V = log_probs.shape[-1]
        scores = log_probs.view(B, nb, V).add_(running_scores[:, :, None]).view(B, nb * V)
        if g.do_sample:
            cand_index = torch.multinomial(F.softmax(scores, dim=-1), k, generator=rng)
            cand_scores, order = scores.gather(1, cand_index).sort(dim=-1, descending=True)
            cand_index = cand_index.gather(1, order)
        else:
            cand_scores, cand_index = fast.top_k(scores, k)  # (B, 2nb)
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
        s = cand_scores / ((t + 1) ** lp)
        s += (is_finished.all(-1, keepdim=True) & (g.early_stopping is True)).float() * NEG
        s += (~improvable).float() * NEG
        s += (~just_finished) * NEG
        merged = torch.cat((finished_scores, s), dim=1)
        top = merged.topk(nb).indices
        finished = _gather(torch.cat((finished, cand), dim=1), top)
        finished_scores = _gather(merged, top)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), top)
        finished_len = _gather(torch.cat((finished_len, torch.full_like(parent, t + 1)), dim=1), top)

        # Can a running beam still beat the worst finished hypothesis?
        best_len = g.new_tokens if g.early_stopping == "never" and lp > 0 else t + 1
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if (t + 1) % every == 0 or t + 2 >= L:
            all_full = bool(is_finished.all()) and g.early_stopping is True
            if not bool(improvable.any()) or all_full or bool(stops.all()):
                break
        yield

    n = g.num_return_sequences
    out = finished[:, :n].reshape(B * n, L)
    length = finished_len[:, :n].max()
    return out[:, :1 + int(length)], finished_scores[:, :n].reshape(B * n)
