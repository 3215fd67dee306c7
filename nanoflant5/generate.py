"""Generation: greedy, sampling and beam search over a whole padded batch at once, with a static KV cache.

The encoder runs once; each decoder layer's cross-attention keys and values are computed once; each step feeds one
token per row and writes its keys and values into the cache. Tokens are scored in float32, logits are processed in
transformers' order (sequence bias, repetition penalty, n-gram blocking, bad words, minimum length, suppressed
tokens, then temperature, top-k, top-p, min-p, typical, epsilon and eta cutoffs when sampling), and beam search
follows transformers' (>= 4.50) vectorized algorithm step for step, so deterministic settings give transformers'
rows exactly, and sampling draws the same tokens from the same random stream.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .config import GenerationConfig
from . import kernels
from .model import T5, KVCache, padding_mask

NEG = -1.0e9  # transformers' "impossible" beam score: added, not assigned, so the arithmetic matches
# Steps between checks of "all rows finished?" (each check waits for the device). Decoding past the point where
# everything finished changes no output (greedy rows are trimmed, finished beams cannot be displaced), so on an
# accelerator the loop checks only every few steps and never stalls the queue in between.
CHECK_EVERY = {"cpu": 1, "default": 8}


# Faster kernels for the decoding step's linear layers on CPU (see fast_linears): nanoflant5's own for 1-4 rows
# (kernels.py), MKL's packed GEMM (x86 CPU builds of torch) for more.
KERNELS = True  # tests switch them off to compare with MKL
MKL_PACKING = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
PACK_ROWS = range(4, 65)  # rows per step where packing measured faster (benchmarks: flan-t5-small)
PACK_MIN_STEPS = 16
KEEP_BYTES = 2 ** 31  # compiled decoding keeps packed copies between calls up to this size (see fast_linears)


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


@torch.inference_mode()
def generate(model: T5, input_ids, attention_mask=None, *, seed: int | None = None,
             generator: torch.Generator | None = None, return_scores: bool = False, compile: bool = False,
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
    step through torch.compile (compiled_step): the first call of each kind compiles (15-40 s on CPU for
    flan-t5-small), later ones decode faster (see the README), and batched CPU decoding keeps its packed weights
    between calls (fast_linears)."""
    g, attention_mask, rng = prepare(model, input_ids, attention_mask, seed, generator, kwargs)
    encoded = model.encode(input_ids, attention_mask)
    B = input_ids.shape[0]
    # copies of each input: its beams, or the sequences sampled from it (transformers repeats the input)
    copies = g.num_beams if g.num_beams > 1 else g.num_return_sequences
    screen = None if return_scores else output_screen(model, g, B * copies)
    with fast_linears(model, B * copies, g.new_tokens, output_layer=screen is None, keep=compile):
        step, cache = decoder_steps(model, encoded, attention_mask, copies, g.new_tokens + 1, compile, screen)
        if g.num_beams == 1:
            rows, scores = None, None
            for rows, scores in token_steps(step, B * copies, model.config, g, rng, input_ids.device,
                                            check_every(input_ids.device), return_scores, screen):
                pass
            rows = trim(rows, model.config.eos_token_id)
        else:
            rows, scores = beam_search(step, cache, B, model.config, g, rng, input_ids.device)
    return (rows, scores) if return_scores else rows


@torch.inference_mode()
def stream(model: T5, input_ids, attention_mask=None, *, seed=None, generator=None, compile: bool = False,
           **kwargs):
    """Greedy or sampled decoding that yields each step's new tokens, a LongTensor [batch] (padding for rows that
    already ended), as soon as they are chosen. The tokens are those generate() returns for the same arguments
    (compile as there)."""
    g, attention_mask, rng = prepare(model, input_ids, attention_mask, seed, generator, kwargs)
    if g.num_beams != 1 or g.num_return_sequences != 1:
        raise ValueError("streaming supports greedy decoding and sampling with one sequence per input")
    encoded = model.encode(input_ids, attention_mask)
    screen = output_screen(model, g, input_ids.shape[0])
    with fast_linears(model, input_ids.shape[0], g.new_tokens, output_layer=screen is None, keep=compile):
        step, _ = decoder_steps(model, encoded, attention_mask, 1, g.new_tokens + 1, compile, screen)
        for rows, _ in token_steps(step, input_ids.shape[0], model.config, g, rng, input_ids.device, screen=screen):
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


def decoder_steps(model: T5, encoded, attention_mask, copies: int, max_len: int, compile: bool = False,
                  screen: OutputScreen | None = None):
    """A function step(tokens (N,), pos) -> float32 logits (N, vocab) for N = batch * copies rows (the copies of an
    input are adjacent), and the KVCache it fills. compile: the step goes through torch.compile (compiled_step).
    screen: the step returns the screen's bounds for the output layer's inputs instead of logits (so that, compiled,
    they are computed in the step's graph)."""
    cross_kv = model.decoder.project(encoded)  # one per input, shared by its copies (CrossAttention.forward)
    cross_mask = padding_mask(attention_mask, encoded.dtype)
    bias = model.decoder.causal_bias(max_len)  # (1, H, max_len, max_len); step pos uses row pos
    cache = KVCache(model.config, encoded.shape[0] * copies, max_len, encoded.dtype, encoded.device)

    def step(tokens, pos: int):
        x = model.shared(tokens[:, None])  # (N, 1, d_model)
        hidden = model.decoder(x, bias[:, :, pos:pos + 1, :pos + 1], cross_kv, cross_mask, cache, pos)[:, -1]
        return screen.bounds(model.head_inputs(hidden)) if screen is not None else model.logits(hidden).float()

    return (compiled_step(step, encoded.device) if compile else step), cache


def compiled_step(step, device):
    """torch.compile of a decoding step, with dynamic shapes so one compilation serves every position (and later
    calls with the same model). If compiling fails (no C++ compiler for the CPU backend, an unsupported setup), one
    warning, then the eager step."""
    fast = torch.compile(step, dynamic=True, options={"cpp_wrapper": True} if device.type == "cpu" else None)

    def run(tokens, pos: int):
        nonlocal fast
        if fast is not None and pos > 0:  # position 0 runs eagerly: dynamo would compile a graph just for it
            try:
                return fast(tokens, pos)
            except Exception as e:  # a step that fails eagerly too raises again below
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"torch.compile failed, decoding eagerly: {type(e).__name__}: {first_line}")
                fast = None
        return step(tokens, pos)

    return run


@contextmanager
def fast_linears(model: T5, rows: int, steps: int, output_layer: bool = True, keep: bool = False):
    """Inside the block, a decoding step's linear layers (self- and cross-attention, feed-forward, output layer) run
    on faster CPU kernels than F.linear, for the number of rows every step feeds, where that pays: CPU, float32, no
    autocast, 16 or more steps.
    - 1-4 rows: kernels.rows_linear (built on first use; see kernels.py), which reads each weight once a step, in
      order, with software prefetch. Compiled generations, against MKL's matrix-vector product (1 row) and packed
      GEMM (4 rows): flan-t5-small greedy b1 1.02x, beam4 b1 1.19x faster; flan-t5-base 1.05x and 1.22x.
    - 4-64 rows (5-64 with the kernels): MKL's GEMM on copies of the weights prepacked for `rows` rows. For 4 to 64
      rows the packed GEMM makes whole generations 1.1-1.3x faster here (1-3 rows: no faster; 128: 1.01x), and
      packing, which costs about two steps, does not pay for short generations. The copies (~1.35x those weights'
      memory) are made on entry and dropped on exit, unless keep=True (compiled decoding, which keeps its graphs
      too) and they take at most KEEP_BYTES (flan-t5-base's: 0.67 GB): then they stay with the layers for the next
      call with the same row count, which uses them only if the weights still have the fingerprints they had when
      packed, so weights changed between calls (training) never meet a stale copy. Checking costs a quarter of
      packing; keeping made compiled beam4 b1 decoding 1.05-1.16x faster here, batch 8 up to 1.05x.
    output_layer=False: not the output layer (greedy decoding reads it through an OutputScreen)."""
    linears = [model.lm_head] * output_layer + [linear for b in model.decoder.blocks
                                 for linear in (b.attn.qkv, b.attn.o, b.cross.q, b.cross.o, b.ffn.wi, b.ffn.wo)]
    cpu32 = (steps >= PACK_MIN_STEPS and not torch.is_autocast_enabled("cpu")
             and all(linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32 for linear in linears))
    if cpu32 and KERNELS and all(kernels.fits(linear.weight, rows) for linear in linears):
        with forwards(linears, _KERNEL_FORWARDS, torch.ops.nanoflant5_cpu.rows_linear):
            yield
        return
    if not (cpu32 and MKL_PACKING and rows in PACK_ROWS):
        yield
        return
    keep = keep and sum(linear.weight.nbytes for linear in linears) * 1.4 <= KEEP_BYTES  # (copies: ~1.35x)
    packed = []  # keys of this block's copies
    try:
        for linear in linears:
            w = linear.weight
            key = (w.data_ptr(), w.shape)
            _PACKED[key] = pack(linear, rows, keep), rows
            packed.append(key)
        with forwards(linears, _FORWARDS, torch.ops.nanoflant5.packed_linear):
            yield
    finally:
        for key in packed:
            _PACKED.pop(key, None)


@contextmanager
def forwards(linears, cache: weakref.WeakKeyDictionary, op):
    """Inside the block, each linear layer's forward is op(x, weight=its weight): for each layer and op the same
    object every call, so a compiled step's guards still hold."""
    try:
        for linear in linears:
            forward = cache.get(linear)
            if forward is None or forward.keywords["weight"] is not linear.weight:
                forward = cache[linear] = partial(op, weight=linear.weight)
            linear.forward = forward
        yield
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)  # back to nn.Linear.forward


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> (rows, its weight's fingerprint, copy)


def pack(linear: nn.Linear, rows: int, keep: bool):
    """The linear layer's weight packed for `rows` rows: its kept copy if that is still valid (see fast_linears)."""
    w = linear.weight
    if not keep or not fingerprintable(w):
        return _mkl_pack(w, rows)
    marks = fingerprint(w, random_probe(w.shape[1], w.dtype))
    kept = _KEPT.get(linear)
    if kept is None or kept[0] != rows or not same(marks, kept[1]):
        _KEPT.pop(linear, None)  # the stale copy goes before the new one is made
        kept = _KEPT[linear] = rows, marks, _mkl_pack(w, rows)
    return kept[2]


# The packed linear as an operator of its own, which torch.compile calls as it is (it cannot trace MKL's packed
# weights). The packed copies are looked up by the weight's address and shape while fast_linears has them.
_PACKED: dict[tuple, tuple[torch.Tensor, int]] = {}
_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> its packed forward
_KERNEL_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> its rows_linear forward
if MKL_PACKING:
    _mkl_linear, _mkl_pack = torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_reorder_linear_weight

    def _packed_linear(x, weight):
        packed, rows = _PACKED.get((weight.data_ptr(), weight.shape), (None, 0))
        if packed is None or x.numel() != rows * x.shape[-1] or x.dtype != weight.dtype:
            return F.linear(x, weight)
        return _mkl_linear(x, packed, weight, None, rows)

    if not hasattr(torch.ops.nanoflant5, "packed_linear"):  # once per process (importlib.reload runs this again)
        _lib = torch.library.Library("nanoflant5", "DEF")
        _lib.define("packed_linear(Tensor x, Tensor weight) -> Tensor")
        _lib.impl("packed_linear", lambda x, weight: _packed_linear(x, weight), "CPU")  # the current definition
        torch.library.register_fake("nanoflant5::packed_linear",
                                    lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_lib)


# Greedy decoding's output layer through an int8 screen (OutputScreen). On CPU the output layer is ~40% of the bytes a
# flan-t5-small step reads; its int8 copy is a quarter of that.
SCREEN = hasattr(torch, "_int_mm")  # tests switch it off to compare with the full output layer
SCREEN_MIN_STEPS = 16  # the first call makes the int8 copy (~0.2 s for flan-t5-small): not for short generations
SCREEN_MAX = 0.25  # more candidate tokens than this fraction of the vocabulary: the full output layer is cheaper
OUTLIERS = 8  # channels of the output layer's input that the screen multiplies in float32 (OutputScreen.bounds)
_SCREENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm_head -> its OutputScreen


def output_screen(model: T5, g: GenerationConfig, rows: int):
    """The OutputScreen of the model's output layer for greedy decoding (no beams, no sampling) on CPU in float32 or
    float64 (16 or more steps; a plain bias-free nn.Linear without hooks), else None. It is made on first use and kept
    while the weights keep their fingerprint. rows: per step; 1-8 take kernels.int8_rows where it is built."""
    lm_head = model.lm_head
    w = lm_head.weight
    if (not SCREEN or g.num_beams > 1 or g.do_sample or g.new_tokens < SCREEN_MIN_STEPS
            or type(lm_head) is not nn.Linear or lm_head.bias is not None
            or lm_head._forward_hooks or lm_head._forward_pre_hooks or "forward" in lm_head.__dict__
            or _global_forward_hooks or _global_forward_pre_hooks or w.device.type != "cpu"
            or w.dtype not in (torch.float32, torch.float64) or not fingerprintable(w)
            or torch.is_autocast_enabled("cpu")):
        return None
    screen = _SCREENS.get(lm_head)
    if screen is None or screen.q_t.shape != w.shape[::-1] or not screen.fingerprint_matches(w):
        screen = _SCREENS[lm_head] = OutputScreen(w)
    screen.weight = w
    screen.kernel = (KERNELS and rows in kernels.INT8_ROWS and w.shape[1] <= 65536 and kernels.available()
                     and kernels.INT8)
    return screen if screen.usable else None


def fingerprint(w, probe):
    """Each row's sum of its bytes read as 64-bit integers (wrapping: any change to one element changes it) and its
    product with a fixed random vector (a permutation within the row changes that). How a kept OutputScreen is
    checked against the weights (~3 ms for flan-t5-small's): version counters would not do, as inference tensors
    have none and fused optimizers do not bump them."""
    w = w.detach()
    return w.view(torch.int64).sum(1), w @ probe


def fingerprintable(w) -> bool:
    """Whether fingerprint() can read w's rows as 8-byte words."""
    size = w.element_size()
    return w.is_contiguous() and not (w.shape[1] * size) % 8 and not (w.storage_offset() * size) % 8


def same(marks, other) -> bool:
    return all(torch.equal(a, b) for a, b in zip(marks, other))


_PROBES: dict = {}


def random_probe(n: int, dtype):
    """The fixed random vector of n entries that fingerprints use."""
    if (n, dtype) not in _PROBES:
        _PROBES[n, dtype] = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _PROBES[n, dtype]


class OutputScreen:
    """argmax(process(x @ W.T)) for greedy decoding, where W is the output layer's weight (vocab, K) and `process`
    applies transformers' greedy logits processors, each of which masks tokens or maps every score through a
    nondecreasing function (repetition penalty, sequence bias). The result is the full output layer's token, but W is
    read as int8:

    W_i = s_i q_i + e_i (int8 q_i, per-token scale s_i) and x = x_hat + e_x, where x_hat is r q_x (int8 q_x, per-row
    scale r) but in the few channels with the largest entries, where it keeps x in float32. The exact integer product
    q_x . q_i (kernels.int8_rows or torch._int_mm) plus those channels' products give approx_i = s_i x_hat . q_i, and
    by Cauchy-Schwarz
        |x . W_i - approx_i| = |x . e_i + s_i e_x . q_i| <= ||x|| ||e_i|| + ||e_x|| ||s_i q_i||,
    plus floating-point rounding (at most K * 2^-22 + 1e-6 of ||x|| ||W_i|| here, in any summation order; Higham,
    "Accuracy and Stability of Numerical Algorithms", ch. 3). With that bound b_i, every processed score lies in
    [f(approx_i - b_i), f(approx_i + b_i)], so the best token is among those whose upper end reaches the largest lower
    end: only they get logits from W in full precision (~10-20 of flan-t5's 32128 tokens per row, measured). Non-finite
    inputs, or too many candidates, take the full output layer.

    bounds() gives approx_i -+ b_i with tensor operations of fixed shapes, so the compiled decoding step computes them
    in its own graph; argmax() takes it from there."""

    def __init__(self, weight):
        w = weight.detach()
        self.weight = weight
        self.probe = random_probe(w.shape[1], w.dtype)
        self.fingerprint = fingerprint(w, self.probe)
        amax = w.abs().amax(1)
        self.usable = bool(torch.isfinite(amax).all())
        self.scale = normal_or_one((amax / 127).float())  # s_i, (vocab,)
        q = torch.round(w / self.scale[:, None].to(w.dtype)).clamp_(-127, 127)
        e = torch.addcmul(w, self.scale[:, None].to(w.dtype), q, value=-1)  # e_i, up to rounding (bounded below)
        u = 2.0 ** -24
        w_norm = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64)
        e_norm = (torch.linalg.vector_norm(e, dim=1, dtype=torch.float64) + u * w_norm) * (1 + 3 * u)
        # per token: ||e_i|| and ||W_i|| + ||e_i|| (>= ||s_i q_i||), rounded up to float32
        norms = (torch.stack([e_norm, w_norm + e_norm]) * (1 + 2.0 ** -20)).float()
        self.norms = torch.cat([norms, torch.full_like(norms[:1], 2.0 ** -120)])  # (3, vocab), see bounds
        # the most by which ||x|| can grow in an intermediate: ||W_i|| + ||e_i|| (approx, b), 127 sqrt(K) (x_hat . q_i);
        # a tensor, so that a compiled step does not specialize on its value
        self.growth = torch.tensor(max(float(self.norms[1].max()), 127 * w.shape[1] ** 0.5), dtype=torch.float64)
        self.q = q.to(torch.int8)  # (vocab, K)
        self.q_t = self.q.t()  # (K, vocab): the layout _int_mm reads fastest for one row
        self.q_rows = self.q_t.contiguous()  # the same, row by row: the outlying entries' rows are read from it
        self.rounding = w.shape[1] * 2.0 ** -22 + 1e-6
        self.kernel = False  # whether bounds() multiplies with kernels.int8_rows, else torch._int_mm (output_screen)

    def fingerprint_matches(self, weight) -> bool:
        return same(fingerprint(weight, self.probe), self.fingerprint)

    def argmax(self, bounds, process):
        """The greedy tokens (M,) from bounds(x) for the output layer's inputs x (M, K). Uses the bounds up: their
        tensors are processed in place and reused."""
        x = bounds[0]
        candidates = self.candidates(bounds, process)
        if candidates is None:
            return argmax(process(F.linear(x, self.weight).float()))
        logits = bounds[2].fill_(float("-inf"))  # (M, vocab): the upper ends' tensor, done with
        logits[:, candidates] = F.linear(x, self.weight.index_select(0, candidates)).float()
        # the first best candidate is the first best token, unless a row's every token is masked (then token 0)
        best, i = process(logits)[:, candidates].max(1)
        return torch.where(best > float("-inf"), candidates[i], 0)

    def candidates(self, bounds, process):
        """The tokens (ascending) that may be some row's greedy choice, or None: take the full output layer. Processes
        the bounds' tensors in place."""
        x, lower, upper, ok = bounds
        if not (self.kernel or int_mm_exact(*x.shape, self.q_t.shape[1])) or not bool(ok):
            return None
        # each row's largest lower end, clamped to finite (the float32 minimum for a row where every token is masked:
        # that row then adds no candidates, and gets token 0 from the -inf logits as from the full layer)
        f32 = torch.finfo(torch.float32)
        lower = process(lower).amax(1, keepdim=True).clamp_(f32.min, f32.max)
        # tokens whose upper end reaches it in some row (for several rows: upper - lower >= 0 exactly when upper >=
        # lower, as float subtraction of distinct finite numbers never rounds to 0, and lower is finite, so no
        # inf - inf; amax over rows is ~4x faster than any() of a compare)
        upper = process(upper)
        reach = upper[0] >= lower[0] if len(upper) == 1 else upper.sub_(lower).amax(0) >= 0
        candidates = reach.nonzero().squeeze(1)
        if candidates.numel() > SCREEN_MAX * upper.shape[1] or not candidates.numel():  # (empty: NaN somewhere)
            return None
        return candidates

    def bounds(self, x):
        """(x, approx - b, approx + b, ok) for the output layer's inputs x (M, K): every token's approximate logit
        approx (M, vocab) minus and plus a bound b on its distance from the logit in float, where ok (a bool tensor)
        is true; where it is false, the full output layer must run. Tensor operations of fixed shapes only, so that
        the compiled decoding step computes them in its own graph."""
        # The OUTLIERS channels with the largest entries (T5's hidden states have a few outlying channels) are
        # multiplied in float32 with q, so that they do not set the int8 scale of the others.
        out = x.abs().amax(0).topk(min(OUTLIERS, x.shape[1])).indices
        x_out = x[:, out].float()  # (M, OUTLIERS)
        rest = x.index_fill(1, out, 0)
        r = normal_or_one((rest.abs().amax(1, keepdim=True) / 127).float())  # (M, 1)
        q_x = torch.round(rest / r.to(x.dtype)).clamp_(-127, 127)
        # x_hat = what the approximation multiplies: r q_x, and the outlying entries rounded to float32
        x_hat = (r.double() * q_x.double()).index_copy(1, out, x_out.double())
        e_x = torch.linalg.vector_norm(x.double() - x_hat, dim=1)
        a = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) + e_x  # >= ||x_hat|| and ||x||
        # one check for all: a non-finite entry of x makes a NaN or infinite, and beyond this bound the integer
        # product times r, or approx +- b, could overflow float32
        ok = a.max() * self.growth < 2.0 ** 125
        # (M, 3) @ (3, vocab): the bound b, a little above the rounding of the sums that use it, plus 2^-120
        # (rounding in float32's subnormal range is absolute, at most 2^-150 an operation)
        c = 1 + 1e-5
        b = torch.stack([a * c, (e_x + self.rounding * a) * c, torch.ones_like(a)], 1).float() @ self.norms
        q_x = q_x.to(torch.int8)
        product = torch.ops.nanoflant5_cpu.int8_rows(q_x, self.q) if self.kernel else torch._int_mm(q_x, self.q_t)
        approx = product * r  # (M, vocab), / s_i
        rows = self.q_rows.index_select(0, out)  # (OUTLIERS, vocab)
        if torch.compiler.is_compiling():  # term by term: the compiled step adds them all in one pass
            for j in range(len(rows)):
                approx = approx + x_out[:, j, None] * rows[j]
        else:
            approx += x_out @ rows.float()
        approx = approx * self.scale
        return x, approx - b, approx + b, ok


def normal_or_one(scale):
    """Scales that are normal float32 numbers, 1 in place of others (0 or subnormal: the int8 part is then 0, and the
    whole value counts as error), so that products with them round relatively."""
    return torch.where(scale >= torch.finfo(torch.float32).tiny, scale, 1.0)


_INT_MM_EXACT: dict[tuple[int, int, int], bool] = {}


def int_mm_exact(rows: int, k: int, n: int) -> bool:
    """Whether torch._int_mm sums int8 products exactly here for (rows, k) x (k, n) inputs, extremes included (a
    kernel that adds pairs of products in saturating int16 would not). Checked once per shape."""
    if (rows, k, n) not in _INT_MM_EXACT:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
        block = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=gen)
        a[0], a[-1, ::2], block[:16], block[16:32] = 127, -127, 127, -127
        reps = -(-n // 64)
        exact = (a.double() @ block.double().t()).repeat(1, reps)[:, :n]  # exact: |sums| < 2^53
        b = block.repeat(reps, 1)[:n]  # (n, k): the block over and over
        _INT_MM_EXACT[rows, k, n] = torch.equal(torch._int_mm(a, b.t()).double(), exact)
    return _INT_MM_EXACT[rows, k, n]


def trim(rows, eos: int):
    """Cut the columns decoded after every row had ended (see CHECK_EVERY): transformers stops at that step."""
    ended = rows[:, 1:] == eos
    if not bool(ended.any(1).all()):
        return rows
    return rows[:, :int(ended.float().argmax(1).max()) + 2]


def token_steps(step, N: int, cfg, g: GenerationConfig, rng, device, every: int = 1, want_scores: bool = False,
                screen: OutputScreen | None = None):
    """Greedy decoding or sampling, one token per row per step. Yields (rows so far, scores so far: None unless
    want_scores) after the start token and after every step; rows that ended get padding. Checks for the end every
    `every` steps. screen: greedy decoding through an OutputScreen; step returns its bounds."""
    tokens = torch.full((N, g.new_tokens + 1), cfg.pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = cfg.decoder_start_token_id
    done = torch.zeros(N, dtype=torch.bool, device=device)
    total = torch.zeros(N, device=device) if want_scores else None
    yield tokens[:, :1], total
    for t in range(g.new_tokens):
        out = step(tokens[:, t], t)  # logits, or the screen's bounds
        process = partial(process_scores, tokens=tokens[:, :t + 1], t=t, g=g, eos=cfg.eos_token_id, min_keep=1)
        log_probs = F.log_softmax(out, dim=-1) if want_scores else None  # before `process` changes out in place
        if screen is not None:
            next_token = screen.argmax(out, process)
        elif g.do_sample:
            next_token = torch.multinomial(F.softmax(process(out), dim=-1), 1, generator=rng).squeeze(1)
        else:
            next_token = argmax(process(out))
        next_token = next_token.masked_fill(done, cfg.pad_token_id)
        if want_scores:
            total = total + log_probs.gather(1, next_token[:, None]).squeeze(1).masked_fill(done, 0.0)
        tokens[:, t + 1] = next_token
        done |= next_token == cfg.eos_token_id
        yield tokens[:, :t + 2], total
        if (t + 1) % every == 0 and done.all():
            return


# argmax and top_k over a vocabulary-sized last dimension, by blocks of CHUNK entries: on CPU, torch's argmax and
# topk scan it element by element, while amax is vectorized. Elsewhere (and for other lengths) torch's own.
CHUNK = 128


def argmax(scores):
    """scores.argmax(-1) for 2-D scores, exactly (the first maximum of each row, NaN counting as the maximum): the
    first block holding the row's maximum, then the first maximum within it. ~5x faster than argmax on CPU for
    flan-t5's vocabulary."""
    N, n = scores.shape
    if n % CHUNK or scores.device.type != "cpu":
        return scores.argmax(-1)
    blocks = scores.reshape(N, n // CHUNK, CHUNK)
    block = blocks.amax(-1).argmax(-1, keepdim=True)  # (N, 1)
    within = blocks.gather(1, block[..., None].expand(-1, -1, CHUNK)).squeeze(1).argmax(-1)
    return block.squeeze(1) * CHUNK + within


def top_k(scores, k: int):
    """scores.topk(k) for 2-D scores: the k largest entries lie in the k blocks with the largest maxima (any other
    block's entries are each matched or outdone by k block maxima), so only those k blocks are searched. The same
    values as topk; equal entries may come in another order. ~7x faster than topk on CPU for beam search's
    (batch, beams * vocabulary) scores."""
    N, n = scores.shape
    if n % CHUNK or n // CHUNK < k or scores.device.type != "cpu":
        return scores.topk(k)
    blocks = scores.reshape(N, n // CHUNK, CHUNK)
    best = blocks.amax(-1).topk(k).indices  # (N, k)
    values, i = blocks.gather(1, best[..., None].expand(-1, -1, CHUNK)).view(N, k * CHUNK).topk(k)
    return values, best.gather(1, i // CHUNK) * CHUNK + i % CHUNK


def _gather(x, index):
    """x[b, index[b, j], ...] for x (B, n, ...) and index (B, m)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


def beam_search(step, cache: KVCache, batch: int, cfg, g: GenerationConfig, rng, device):
    """Beam search as transformers runs it: at each step keep the 2*num_beams best continuations over all beams of
    an input (or, when sampling, 2*num_beams drawn without replacement); the best num_beams that did not end
    continue; those among the top num_beams that ended (</s> or the length limit) compete, scored
    sum(log p) / length**length_penalty, for the num_beams finished slots. early_stopping: True stops an input once
    num_beams hypotheses are finished; False stops when the best running beam, at its current length, cannot beat
    the worst finished one; "never" assumes it could grow to the length limit."""
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
    # top_k may order equal candidates unlike torch.topk, and equal scores are common only with half-precision logits
    search = top_k if cache.kv[0].dtype in (torch.float32, torch.float64) else torch.topk

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
            cand_scores, cand_index = search(scores, k)  # (B, 2nb)
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

    n = g.num_return_sequences
    out = finished[:, :n].reshape(B * n, L)
    length = finished_len[:, :n].max()
    return out[:, :1 + int(length)], finished_scores[:, :n].reshape(B * n)
