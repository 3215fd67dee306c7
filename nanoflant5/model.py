"""The T5 / FLAN-T5 architecture, and nothing else.

T5: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(arXiv:1910.10683). T5 v1.1 and FLAN-T5 (Chung et al. 2022, arXiv:2210.11416) keep the layout and change the
feed-forward layer to a gated GELU and untie the output layer. transformers' modeling_t5.py is the behavioural
reference; parameter names here are our own (load.py maps the checkpoint's names onto them).

Precision policy (the only one): parameters and activations run in the model's dtype; RMSNorm takes its mean
square in float32; generation scores tokens in float32 (generate.py). float16 only: the feed-forward output
projections `wo` stay float32 (load.py), so their outputs, which exceed float16's range in FLAN-T5, and the residual
stream they join are float32 — transformers' policy for T5 (_keep_in_fp32_modules = ["wo"]).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import GenerationConfig, T5Config

ACT_FNS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"), "silu": F.silu}


class RMSNorm(nn.Module):
    """T5's layer norm: rescale by the root mean square, no mean subtraction and no bias (Zhang & Sennrich 2019,
    "Root Mean Square Layer Normalization", arXiv:1910.07467). The mean square is taken in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu":  # the same arithmetic, one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Map key_pos - query_pos to a bucket, as Mesh TensorFlow does (transformer_layers.py,
    _relative_position_bucket; T5 paper section 2.1). Half the buckets hold the exact distances 0..max_exact-1, the
    other half grow logarithmically up to max_distance; farther distances share the last bucket. Bidirectional
    (encoder) buckets are split between keys before and after the query; causal (decoder) ones see only the past."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores of every layer of a stack. It is computed
    once per stack (only the first layer of a checkpoint holds it) and passed to every block."""

    def __init__(self, config: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nn.Embedding(self.num_buckets, config.num_heads)

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        device = self.embedding.weight.device
        query_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        key_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, q_len, k_len)


class FlexBias:
    """The relative position bias and the masks of one attention pattern as FlexAttention modifiers (PyTorch's
    flex_attention, Dong et al. 2024): the bias is looked up from the (buckets, heads) table inside the fused kernel,
    and padding/causality become a block mask, instead of a dense (B, H, T, S) float mask. Used on CUDA by default
    (see T5.attention_backend); on CPU it is compiled on first use (tens of seconds)."""

    _compiled = None

    def __init__(self, rel: RelativePositionBias, q_len: int, k_len: int, key_mask=None, causal: bool = False):
        from torch.nn.attention.flex_attention import create_block_mask

        table = rel.embedding.weight  # (num_buckets, H)

        def score_mod(score, b, h, q, kv):
            bucket = relative_position_bucket(kv - q, rel.bidirectional, rel.num_buckets, rel.max_distance)
            return score + table[bucket, h].to(score.dtype)

        self.score_mod, self.block_mask = score_mod, None
        if causal:
            self.block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, q_len, k_len,
                                                device=table.device)
        elif key_mask is not None:
            keep = key_mask.bool()
            self.block_mask = create_block_mask(lambda b, h, q, kv: keep[b, kv], keep.shape[0], None, q_len, k_len,
                                                device=table.device)

    def __call__(self, q, k, v):
        if FlexBias._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            FlexBias._compiled = torch.compile(flex_attention, dynamic=False)
        return FlexBias._compiled(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask, scale=1.0)


def attention(q, k, v, bias, dropout: float):
    """Scaled dot-product attention without the 1/sqrt(d) scaling: T5 folds it into the initialisation of the query
    projection (Mesh TensorFlow). `bias` is a float mask (relative position bias plus -inf-like masks) for SDPA, or
    a FlexBias. Inside a compiled decoding step (one query) it is written out as matmul, softmax (in float32 or
    wider, as transformers does), matmul, which inductor fuses with the bias and with beam search's gather of the
    cache (KVCache). Measured on CPU against SDPA called from the graph, flan-t5-small: compiled greedy steps ~1.05x
    faster, beam search steps (with the gather) 1.07-1.15x."""
    if isinstance(bias, FlexBias):
        return bias(q, k, v)
    if torch.compiler.is_compiling() and q.shape[2] == 1 and bias is not None and not dropout:
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # (B, H, 1, S)
        return torch.matmul(scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)


class SelfAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        self.qkv = nn.Linear(config.d_model, 3 * config.inner_dim, bias=False)  # q, k and v fused
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def forward(self, x, bias, cache=None, pos=0, index=None):
        """cache: this layer's buffer (max_len, B, 2, H, D) in the decoder's KVCache; the new keys and values are
        written at positions pos..pos+T-1 and attention reads positions 0..pos+T-1. pos may also be a LongTensor (B,)
        of per-row positions for one new token a row (continuous batching: rows at different positions); attention
        then reads the bias's width of positions, and the bias masks each row's later ones. index: the KVCache's
        index (beam search), where each row's earlier keys and values lie in the buffer."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.d_kv)
        if cache is not None:
            if torch.is_tensor(pos):  # row i's keys and values at (pos[i], i)
                cache[pos, torch.arange(B, device=x.device)] = qkv[:, 0, 1:]  # (B, 2, H, D)
                kv = cache[:bias.shape[-1]]
            else:
                cache[pos:pos + T] = qkv[:, :, 1:].transpose(0, 1)  # (T, B, 2, H, D)
                kv = cache[:pos + T]
            q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D)
            y = self.attend_cache(q, kv, bias, None if index is None else index[:len(kv)])
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
            y = self.attend(q, k, v, bias)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, bias):
        """Attention of q over k and v (B, H, T, D), no cache. (speed.encode runs a kernel in its place.)"""
        return attention(q, k, v, bias, self.dropout if self.training else 0.0)

    def attend_cache(self, q, kv, bias, index=None):
        """Attention of q (B, H, T, D) over the cached keys and values kv (S, B, 2, H, D); index (S, B): where each
        row's history lies in kv.flatten(0, 1) (KVCache.index), else row b's at (s, b). (speed.fast_attention runs
        a kernel in its place.)"""
        if index is not None:  # gather each row's own history
            kv = kv.flatten(0, 1).index_select(0, index.flatten()).view(kv.shape)
        k, v = kv.permute(2, 1, 3, 0, 4)  # 2 x (B, H, S, D), strided views
        return attention(q, k, v, bias, self.dropout if self.training else 0.0)


class CrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * config.inner_dim, bias=False)  # k and v fused
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def project(self, encoded):
        """Keys and values of the encoder output: computed once per input, reused at every decoding step."""
        B, S, _ = encoded.shape
        k, v = self.kv(encoded).view(B, S, 2, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4)  # 2 x (B, H, S, D)
        return k, v

    def forward(self, x, memory, mask):
        """memory: the encoder output (B, S, d_model), or its keys and values from project() (generation). In
        generation the batch may hold G adjacent copies (beams, samples) of each input: then keys, values and mask
        have B / G rows, and the copies' queries attend to them together, as G * T queries of one row."""
        B, T, _ = x.shape
        k, v = self.project(memory) if torch.is_tensor(memory) else memory
        G = B // k.shape[0]
        assert G * k.shape[0] == B, "the batch must hold the same number of copies of every input"
        q = self.q(x).view(B // G, G * T, self.n_heads, self.d_kv).transpose(1, 2)  # (B/G, H, G*T, D)
        return self.o(self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, mask):
        """(speed.fast_attention runs a kernel in its place.)"""
        return attention(q, k, v, mask, self.dropout if self.training else 0.0)


class FeedForward(nn.Module):
    """Original T5: wo(act(wi x)). T5 v1.1 / FLAN-T5: wo(act(wi_0 x) * wi_1 x), the gated variant of Shazeer 2020,
    "GLU Variants Improve Transformer" (arXiv:2002.05202); wi_0 and wi_1 are fused into one projection here."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.gated
        self.act = ACT_FNS[config.activation]
        self.wi = nn.Linear(config.d_model, (2 if config.gated else 1) * config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        h = self.dropout(self.activation(self.wi(x)))
        if isinstance(self.wo, nn.Linear):  # (not int8 layers: quantize.py)
            h = h.to(self.wo.weight.dtype)  # float32 under the float16 policy (load.py)
        return self.wo(h)

    def activation(self, h):
        if not self.gated:
            return self.act(h)
        gate, linear = h.chunk(2, dim=-1)
        return self.act(gate) * linear


class EncoderBlock(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn_norm, self.attn = RMSNorm(config.d_model, eps), SelfAttention(config)
        self.ffn_norm, self.ffn = RMSNorm(config.d_model, eps), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias):
        x = x + self.dropout(self.attn(self.attn_norm(x), bias))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DecoderBlock(nn.Module):
    """Pre-norm residual block: causal self-attention, attention over the encoder output, feed-forward."""

    def __init__(self, config: T5Config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn_norm, self.attn = RMSNorm(config.d_model, eps), SelfAttention(config)
        self.cross_norm, self.cross = RMSNorm(config.d_model, eps), CrossAttention(config)
        self.ffn_norm, self.ffn = RMSNorm(config.d_model, eps), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias, memory, cross_mask, cache=None, pos=0, index=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), bias, cache, pos, index))
        x = x + self.dropout(self.cross(self.cross_norm(x), memory, cross_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def use_flex(stack, x) -> bool:
    """FlexAttention for a stack's self-attention: when asked for, or ("auto") on CUDA unless attention dropout is
    active (flex_attention has none)."""
    if stack.attention_backend == "auto":
        return x.is_cuda and not (stack.training and stack.dropout.p > 0)
    return stack.attention_backend == "flex"


def run_block(block, checkpointing: bool, *args):
    """A block's forward; with activation checkpointing (training) its activations are recomputed in backward."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def padding_mask(attention_mask, dtype):
    """(B, S) 1/0 mask -> additive (B, 1, 1, S) float mask: 0 where attended, the dtype's minimum where padded."""
    pad = attention_mask[:, None, None, :] == 0
    return torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, torch.finfo(dtype).min)


class Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=True)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.checkpointing = False  # activation checkpointing, for training large models
        self.attention_backend = "auto"  # see T5.set_attention_backend

    def forward(self, x, attention_mask=None):
        """x: embedded input (B, S, d_model); attention_mask: (B, S), 0 at padding."""
        bias = self.attention_bias(x.shape[1], attention_mask, x)
        x = self.dropout(x)
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x, bias)
        return self.dropout(self.final_norm(x))

    def attention_bias(self, S: int, attention_mask, x):
        """What every block's self-attention adds to its scores: the relative position bias (1, H, S, S), or with
        padding (B, H, S, S), the dtype's minimum at padded keys; or a FlexBias of both. (speed.encode gives its kernel
        another form.)"""
        if use_flex(self, x):
            return FlexBias(self.relative_bias, S, S, key_mask=attention_mask)
        bias = self.relative_bias(S, S)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(bias.dtype).min)  # (B,H,S,S)
        return bias


class Decoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=False)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_decoder_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.checkpointing = False
        self.attention_backend = "auto"

    def causal_bias(self, T: int):
        """Relative position bias with the causal mask folded in: (1, H, T, T)."""
        bias = self.relative_bias(T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=bias.device).triu(1)
        return bias.masked_fill(future, torch.finfo(bias.dtype).min)

    def project(self, encoded):
        """Every layer's cross-attention keys and values for the encoder output, each (B, H, S, D) contiguous, so that
        a decoding step reads each row's and head's keys as one stream (~1.4x faster attention where it is
        memory-bound: flan-t5-base, 32 rows of 64 tokens)."""
        return [tuple(x.contiguous() for x in block.cross.project(encoded)) for block in self.blocks]

    def forward(self, x, bias, memory, cross_mask, cache=None, pos=0):
        """x: embedded decoder input (B, T, d_model) at positions pos..pos+T-1 (or, T = 1, at per-row positions pos,
        a LongTensor (B,)); bias: causal_bias rows for them; memory: the encoder output, or project() of it
        (generation: computed once, reused every step); cache: a KVCache (generation) or None (teacher forcing)."""
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            layer_cache, index = (None, None) if cache is None else (cache.kv[i], cache.index)
            x = run_block(block, self.checkpointing, x, bias, memory if torch.is_tensor(memory) else memory[i],
                          cross_mask, layer_cache, pos, index)
        return self.dropout(self.final_norm(x))


class KVCache:
    """The decoder's self-attention keys and values, preallocated for the whole generation: per layer one buffer
    (max_len, batch, 2, heads, d_kv), written in place at each step (row i at slot (position, i)). Position-major, so
    the positions in use are one contiguous block, and attention takes the strided (B, H, T, D) view as it is.

    Beam search moves no keys or values: a row that continues another row's beam must attend to that row's history,
    so `index` (max_len, batch) records for each position and row the slot that holds it (flattened over
    (position, row)), and attention gathers the rows through it. Compiled, the gather fuses into attention; eager,
    it is one block copy per layer and step, as a reorder of the cache would be."""

    def __init__(self, config: T5Config, batch: int, max_len: int, dtype, device):
        shape = (max_len, batch, 2, config.num_heads, config.d_kv)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_decoder_layers)]
        self.index = None  # until the first reorder: every row's history is its own

    def rows(self, n: int) -> "KVCache":
        """The same buffers' first n rows (views): continuous batching keeps its running rows first."""
        view = KVCache.__new__(KVCache)
        view.kv, view.index = [buf[:, :n] for buf in self.kv], None
        return view

    def move_row(self, src: int, dst: int, length: int):
        """Copy row src's keys and values at positions 0..length-1 into row dst."""
        for buf in self.kv:
            buf[:length, dst] = buf[:length, src]

    def reorder(self, parents, length: int):
        """Beam search: row i of the batch continues row parents[i]; only the first `length` positions are in use
        (later ones are written by each row itself)."""
        if self.index is None:
            L, N = self.kv[0].shape[:2]
            self.index = torch.arange(L * N, device=parents.device).view(L, N)
        self.index[:length] = self.index[:length, parents]


class T5(nn.Module):
    """Encoder-decoder T5. forward() returns logits; generate() is in generate.py; from_pretrained() in load.py."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig()  # load.py reads the checkpoint's
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # input embedding of both stacks
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def init_weights(self):
        """Random initialisation as Mesh TensorFlow (and transformers) does it: embeddings N(0, 1); the query
        projection N(0, (d_model * d_kv)^-1/2), which stands in for attention's 1/sqrt(d) scaling; every other
        projection N(0, fan_in^-1/2), an untied output layer too (transformers draws it N(0, 1), which makes the
        first logits of a from-scratch model ~sqrt(d_model) large); norms 1."""
        c = self.config
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "shared.weight":
                p.normal_(0.0, 1.0)
            elif name.endswith("attn.qkv.weight") or name.endswith("cross.q.weight"):
                p.normal_(0.0, c.d_model ** -0.5)
                p[:c.inner_dim].normal_(0.0, (c.d_model * c.d_kv) ** -0.5)  # the query rows
            else:  # k, v, o, wi, wo, relative position bias
                p.normal_(0.0, (c.d_model if "relative_bias" in name else p.shape[1]) ** -0.5)
        return self

    def set_dropout(self, p: float):
        """Set every dropout rate (residual, feed-forward, attention weights) to p."""
        self.config.dropout_rate = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, (SelfAttention, CrossAttention)):
                module.dropout = p

    def set_checkpointing(self, enabled: bool = True):
        self.encoder.checkpointing = self.decoder.checkpointing = enabled

    def set_attention_backend(self, backend: str):
        """Self-attention with the relative bias through "sdpa" (a dense float mask), "flex" (FlexAttention, the bias
        computed in the kernel), or "auto" (flex on CUDA, sdpa on CPU). Decoding steps always use SDPA."""
        if backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention backend must be auto, sdpa or flex, got {backend!r}")
        self.encoder.attention_backend = self.decoder.attention_backend = backend
        return self

    def encode(self, input_ids, attention_mask=None):
        return self.encoder(self.shared(input_ids), attention_mask)

    def head_inputs(self, hidden):
        """What the output layer multiplies: the decoder's output, rescaled for the original T5's tied embeddings."""
        if self.config.scale_decoder_outputs:  # original T5 with tied embeddings (Mesh TensorFlow)
            return hidden * self.config.d_model ** -0.5
        return hidden

    def logits(self, hidden):
        return self.lm_head(self.head_inputs(hidden))

    def decode(self, decoder_input_ids, encoded, attention_mask=None):
        """Teacher-forced decoder pass over whole sequences: logits (B, T, vocab)."""
        cross_mask = None if attention_mask is None else padding_mask(attention_mask, encoded.dtype)
        T = decoder_input_ids.shape[1]
        x = self.shared(decoder_input_ids)
        bias = (FlexBias(self.decoder.relative_bias, T, T, causal=True) if use_flex(self.decoder, x)
                else self.decoder.causal_bias(T))
        hidden = self.decoder(x, bias, encoded, cross_mask)
        return self.logits(hidden)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, labels=None):
        """Logits (B, T, vocab). Without decoder_input_ids, labels shifted right (start token first) are used."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def shift_right(self, labels):
        """Decoder inputs for teacher forcing: the start token, then labels[:-1] (ignored -100 labels as padding)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """See generate.generate: greedy, sampling or beam search, arguments as transformers' generate()."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def score(self, input_ids, attention_mask, labels, labels_mask=None):
        """See generate.score: per-row sum of log-probabilities of `labels` and the number of tokens scored."""
        from .generate import score

        return score(self, input_ids, attention_mask, labels, labels_mask)

    def stream(self, input_ids, attention_mask=None, **kwargs):
        """See generate.stream: yields each step's new tokens (greedy or sampling)."""
        from .generate import stream

        return stream(self, input_ids, attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None, quantize=None, adapter=None) -> "T5":
        """quantize="int8" (weight-only) or "w8a8" (int8 activations too): int8 linear layers, low-precision modes
        (quantize.py); adapter: a peft LoRA adapter folder, merged into the weights (lora.py)."""
        from .load import load_model

        return load_model(name_or_path, dtype=dtype, device=device, quantize=quantize, adapter=adapter)
