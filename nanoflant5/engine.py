"""Continuous batching: a scheduler around generate.py's decoding step, for a server.

Requests join the running batch at the first step after their encoder pass (newcomers are encoded together) and
leave at the step they finish; their rows and cache slots go to the next ones. Every running row is decoded by one
call of generate.decode per step, each row at its own position (per-row positions in the KV cache and the relative
bias), with its own input length (padded cross-attention keys and values, masked). Each request's tokens are then
chosen as generate() chooses them (generate.next_tokens: its own settings, history and random stream), so a
request's rows are those of model.generate() on its prompt alone with the same arguments, whatever else is in flight.
The step uses generate()'s speed machinery where it applies (speed.py): the CPU kernel for 1-4 rows, and, when every
running request is greedy, the int8 screen of the output layer with each request's logits processors on its rows.

Beam search keeps its beams' scores across an input's candidates, so a beam request runs its own decoding (as
generate() runs it) one step per engine step, beside the shared batch: it never holds other requests back for its
whole length.

The engine is synchronous and single-threaded: submit() adds a request, step() admits waiting requests and decodes
one token for every running row. The server (serve.py) runs step() in its main thread, HTTP in another.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .generate import beam_steps, changes_scores, decode, decoder_steps, next_tokens, prepare, process_scores
from .model import T5, KVCache, padding_mask
from .speed import Speedups, encode, fast_attention, fast_blocks, fast_layers, fast_linears, output_screen
from .tokenizer import pad_rows


@dataclass
class Request:
    """One prompt and its generation settings (generate()'s keyword arguments; seed as there).
    on_step(request, tokens (n,)) is called after each step with the new token of each of its n rows (the
    padding token for rows that ended); on_done(request) once it has finished, with `rows` set (as generate()
    returns them) or `error` set. logprobs: how many top log-probabilities to keep per row and step (OpenAI's
    `logprobs`); the model's log-probabilities before any processing, as generate(return_scores=True) sums them."""
    input_ids: list[int]
    settings: dict = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None
    on_step: Callable | None = None
    on_done: Callable | None = None
    # set by the engine
    id: int = -1
    rows: torch.Tensor | None = None  # (n, length) when finished
    error: Exception | None = None
    cancelled: bool = False
    top_logprobs: list = field(default_factory=list)  # per step: (chosen log-prob (n,), top values (n, k), ids (n, k))
    g: object = None
    rng: object = None
    tokens: torch.Tensor | None = None  # (n, new_tokens + 1)
    done: torch.Tensor | None = None  # (n,)
    t: int = 0  # steps taken
    beams: object = None  # a beam request's own decoding (generate.beam_steps)

    @property
    def n(self) -> int:
        return self.g.num_return_sequences


class Engine:
    """Continuous batching over one model. max_batch_size: rows decoded together (a request of n sequences takes n);
    max_new_tokens: the cache's length, the most new tokens a request may ask for."""

    def __init__(self, model: T5, max_batch_size: int = 32, max_new_tokens: int = 512):
        self.model, self.capacity, self.max_new_tokens = model, max_batch_size, max_new_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cfg = model.config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # requests in the shared batch
        self.beam_requests: list[Request] = []
        self.slots: list[tuple[Request, int]] = []  # row i of the batch: (request, which of its n rows)
        self.pos: list[int] = []  # row i's position (tokens fed so far)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # row i's latest token
        self.cross_kv: list | None = None  # per decoder layer (k, v), each (rows, H, S, D)
        self.cross_mask: torch.Tensor | None = None  # (rows, 1, 1, S)
        self.cache: KVCache | None = None  # made on first use
        self.bias = None  # the decoder's causal bias (1, H, L, L), L = max_new_tokens + 1
        self.plain = None  # Speedups without the screen: every row's logits
        self._ids = itertools.count()
        self.step_rows = 0  # rows the last step decoded
        self._screen = None  # the OutputScreen, False where there is none (see screen())
        self._panels = weakref.WeakKeyDictionary()  # the decoder's weights as panel_linear reads them (fast_linears)

    # ------------------------------------------------------------------------------------------------ requests

    def check(self, request: Request):
        """Validate a request's settings and length (raises ValueError with one clear line); sets its g and rng."""
        ids = torch.tensor([request.input_ids], dtype=torch.long, device=self.device)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        if int(ids.max()) >= self.cfg.vocab_size or int(ids.min()) < 0:
            raise ValueError("the prompt has token ids outside the vocabulary")
        g, _, rng = prepare(self.model, ids, None, request.seed, None, dict(request.settings))
        if g.new_tokens > self.max_new_tokens:
            raise ValueError(f"at most {self.max_new_tokens} new tokens per request, asked for {g.new_tokens}")
        if g.num_return_sequences > self.capacity:
            raise ValueError(f"at most {self.capacity} sequences per request, asked for {g.num_return_sequences}")
        request.g, request.rng = g, rng

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first: ValueError for bad settings); it joins at the next step."""
        if request.g is None:
            self.check(request)
        request.id = next(self._ids)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request):
        """Stop a request (a client that went away): its rows are freed at the next step."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.beam_requests)

    @property
    def rows(self) -> int:
        return len(self.slots)

    # ------------------------------------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self):
        """Admit waiting requests, then one token for every running row, and one step of each beam request."""
        self._drop_cancelled()
        self._admit()
        self.step_rows = 0
        if self.slots:
            self._step_batch()
        for request in list(self.beam_requests):
            self._step_beams(request)

    def run_until_idle(self, max_steps: int = 1_000_000):
        for _ in range(max_steps):
            if not self.busy:
                return
            self.step()

    def _admit(self):
        new = []
        while self.waiting:
            request = self.waiting[0]
            if request.g.num_beams > 1:  # beams decode on their own, beside the batch
                self.waiting.popleft()
                self._start_beams(request)
                continue
            if self.rows + sum(r.n for r in new) + request.n > self.capacity:
                break
            new.append(self.waiting.popleft())
        if not new:
            return
        if self.cache is None:
            self.cache = KVCache(self.cfg, self.capacity, self.max_new_tokens + 1, self.dtype, self.device)
            self.bias = self.model.decoder.causal_bias(self.max_new_tokens + 1)
            self.plain = Speedups(self.model, new[0].g, 1, self.dtype, compile=False, scores=True)
        # encode the newcomers together (padded on the right), one copy of the keys and values per row
        ids, mask = pad_rows([r.input_ids for r in new], self.cfg.pad_token_id, self.device)
        copies = torch.tensor([r.n for r in new], device=self.device)
        encoded = encode(self.model, ids, mask)
        kv = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0))
              for k, v in self.model.decoder.project(encoded)]
        self._join(kv, padding_mask(mask, encoded.dtype).repeat_interleave(copies, 0))
        start = self.cfg.decoder_start_token_id
        for r in new:
            r.tokens = torch.full((r.n, r.g.new_tokens + 1), self.cfg.pad_token_id, dtype=torch.long,
                                  device=self.device)
            r.tokens[:, 0] = start
            r.done = torch.zeros(r.n, dtype=torch.bool, device=self.device)
            for j in range(r.n):
                self.slots.append((r, j))
                self.pos.append(0)
            self.running.append(r)
        self.last = torch.cat([self.last, torch.full((sum(r.n for r in new),), start, dtype=torch.long,
                                                      device=self.device)])

    def _join(self, kv, mask):
        """Append rows' cross-attention keys, values (rows, H, S, D) and masks (rows, 1, 1, S) to the batch's, both
        padded (masked) to the longer input."""
        if self.cross_kv is None or not self.slots:
            self.cross_kv, self.cross_mask = kv, mask
            return
        S = max(mask.shape[-1], self.cross_mask.shape[-1])
        low = torch.finfo(mask.dtype).min

        def keys(x):  # (rows, H, S', D) -> (rows, H, S, D), zeros after S'
            return F.pad(x, (0, 0, 0, S - x.shape[2]))

        self.cross_kv = [(torch.cat([keys(k0), keys(k1)]), torch.cat([keys(v0), keys(v1)]))
                         for (k0, v0), (k1, v1) in zip(self.cross_kv, kv)]
        self.cross_mask = torch.cat([F.pad(m, (0, S - m.shape[-1]), value=low) for m in (self.cross_mask, mask)])

    def _step_batch(self):
        N = self.step_rows = self.rows
        L = max(self.pos) + 1
        pos = torch.tensor(self.pos, device=self.device)
        bias = self.bias[0, :, pos, :L].transpose(0, 1).unsqueeze(2)  # (N, H, 1, L)
        where: dict[int, torch.Tensor] = {}  # request id -> its rows, in the order of its sequences
        for i, (r, j) in enumerate(self.slots):
            where.setdefault(r.id, [0] * r.n)[j] = i
        where = {k: torch.tensor(v, device=self.device) for k, v in where.items()}
        # greedy requests only, no log-probabilities asked for: the output layer through the int8 screen
        screen = None if any(r.g.do_sample or r.logprobs is not None for r in self.running) else self.screen(N)
        with fast_linears(self.model, N, self.max_new_tokens, output_layer=screen is None, packing=False,
                          panels=self._panels), \
                fast_layers(self.model), fast_attention(self.model), fast_blocks(self.model, N):
            hidden = decode(self.model, self.last, bias, self.cross_kv, self.cross_mask, self.cache.rows(N), pos)
            if screen is None:
                logits = self.model.logits(hidden).float()  # (N, vocab)
            else:
                failed = {}
                greedy = screen.argmax(screen.bounds(self.model.head_inputs(hidden)),
                                       partial(self._process, where=where, failed=failed))
        chosen = self.last.clone()
        finished, failures = [], []
        for r in self.running:
            rows = where[r.id]
            try:
                if screen is None:
                    token = self._choose(r, logits.index_select(0, rows))
                elif r.id in failed:
                    raise failed[r.id]
                else:
                    token = self._record(r, greedy.index_select(0, rows))
            except Exception as e:  # this request fails; the others go on
                failures.append((r, e))
                continue
            chosen[rows] = token
            if bool(r.done.all()) or r.t >= r.g.new_tokens or r.cancelled:
                finished.append(r)
        self.last = chosen
        self.pos = [p + 1 for p in self.pos]
        for r in finished:
            self._finish(r, r.tokens[:, :r.t + 1])
        for r, e in failures:
            self._finish(r, error=e)

    def screen(self, rows: int):
        """The model's OutputScreen (speed.py) for greedy steps of `rows` rows, where it applies, else None. Made
        (or checked against the weights) once: the engine owns its model, whose weights do not change under it."""
        if self._screen is None:
            self._screen = output_screen(self.model, GenerationConfig(max_new_tokens=self.max_new_tokens), None)
            self._screen = self._screen or False
        return self._screen if self._screen and self._screen.use_rows(rows) else None

    def _process(self, scores, where, failed):
        """Each greedy request's logits processors on its rows of scores (N, vocab), in place (the screen's
        `process`); a request whose processing fails is noted in `failed` and left out."""
        eos = self.cfg.eos_token_id
        for r in self.running:
            if r.id not in failed and changes_scores(r.g, r.t):
                rows = where[r.id]
                try:
                    scores[rows] = process_scores(scores.index_select(0, rows), r.tokens[:, :r.t + 1], r.t, r.g, eos,
                                                  min_keep=1)
                except Exception as e:  # noqa: BLE001 - that request fails at the end of the step
                    failed[r.id] = e
        return scores

    def _choose(self, r: Request, out):
        """Request r's next tokens from its rows' logits (as generate() chooses them), recorded in r."""
        log_probs = F.log_softmax(out, dim=-1) if r.logprobs is not None else None  # before out is processed
        token = next_tokens(out, r.tokens, r.t, r.g, self.cfg.eos_token_id, r.rng, self.plain)
        if log_probs is not None:
            top = log_probs.topk(max(r.logprobs, 1))
            masked = token.masked_fill(r.done, self.cfg.pad_token_id)
            r.top_logprobs.append((log_probs.gather(1, masked[:, None]).squeeze(1), top.values, top.indices))
        return self._record(r, token)

    def _record(self, r: Request, token):
        """Request r's chosen tokens (n,) for this step: padding for rows that ended, then recorded in r."""
        token = token.masked_fill(r.done, self.cfg.pad_token_id)
        r.tokens[:, r.t + 1] = token
        r.done |= token == self.cfg.eos_token_id
        r.t += 1
        if r.on_step is not None:
            r.on_step(r, token)
        return token

    def _finish(self, request: Request, rows=None, error=None):
        """Take a finished (or failed, or cancelled) request out: its rows' slots go to the batch's last rows."""
        if request in self.running:
            self.running.remove(request)
            for i in reversed([i for i, (q, _) in enumerate(self.slots) if q is request]):
                self._free_row(i)
        if request in self.beam_requests:
            self.beam_requests.remove(request)
        request.rows, request.error = (None if rows is None else rows.clone()), error
        if request.on_done is not None:
            request.on_done(request)

    def _free_row(self, i: int):
        """Move the batch's last row into row i (keys, values, cross-attention, position, token), and drop it."""
        last = self.rows - 1
        if i != last:
            self.cache.move_row(last, i, self.pos[last] + 1)
            for k, v in self.cross_kv:
                k[i], v[i] = k[last], v[last]
            self.cross_mask[i] = self.cross_mask[last]
            self.last[i] = self.last[last]
            self.slots[i], self.pos[i] = self.slots[last], self.pos[last]
        self.slots.pop()
        self.pos.pop()
        self.last = self.last[:last]
        self.cross_kv = [(k[:last], v[:last]) for k, v in self.cross_kv]
        self.cross_mask = self.cross_mask[:last]

    def fail_all(self, error: Exception):
        """Every request in flight or waiting ends with `error` (a step that failed as a whole); the batch is
        emptied."""
        ended = self.running + self.beam_requests + list(self.waiting)
        self.running, self.beam_requests = [], []
        self.waiting.clear()
        self.slots, self.pos, self.cross_kv, self.cross_mask = [], [], None, None
        self.last = self.last[:0]
        for r in ended:
            r.rows, r.error = None, error
            if r.on_done is not None:
                r.on_done(r)

    def _drop_cancelled(self):
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r)
        for r in [r for r in self.running + self.beam_requests if r.cancelled]:
            self._finish(r)

    # ------------------------------------------------------------------------------------------------ beams

    def _start_beams(self, request: Request):
        """A beam request's own decoding, as generate() runs it, advanced one step per engine step."""
        ids = torch.tensor([request.input_ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        encoded = encode(self.model, ids, mask)
        g = request.g
        fast = Speedups(self.model, g, g.num_beams, encoded.dtype, compile=False, scores=True)
        step, cache = decoder_steps(self.model, encoded, mask, g.num_beams, g.new_tokens + 1, fast)
        request.beams = beam_steps(step, fast, cache, 1, self.cfg, g, request.rng, self.device)
        self.beam_requests.append(request)

    def _step_beams(self, request: Request):
        try:
            next(request.beams)
        except StopIteration as end:
            rows, _ = end.value
            request.t = rows.shape[1] - 1
            self._finish(request, rows)
