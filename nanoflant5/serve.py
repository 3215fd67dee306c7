"""An OpenAI-compatible server for one FLAN-T5 model, batching requests as they arrive (engine.py).

    nanoflant5 serve --model google/flan-t5-base --port 8000
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Translate English to German: How old are you?", "max_tokens": 32, "temperature": 0}'

One process, one model, one thread that owns it and runs the engine's steps (Worker); the HTTP side (FastAPI on
uvicorn) checks each request, hands it to that thread and turns its tokens into OpenAI's responses. Routes:
POST /v1/completions, POST /v1/chat/completions (FLAN-T5 has no chat template: the messages' contents are joined by
newlines into one prompt), GET /v1/models, GET /health, GET /metrics (Prometheus). Errors are OpenAI's
{"error": {"message", "type", "param", "code"}}: 400 for a bad body or value, 404 for another model's name, 429 with
Retry-After when the queue is full, 503 while shutting down (SIGTERM/SIGINT: stop accepting, finish every request in
flight, exit 0). Sampling defaults are OpenAI's (temperature 1, top_p 1, no top-k); temperature 0 is greedy.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, Request
from .tokenizer import TextStream, Tokenizer


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------- requests

COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "user",
          "top_k", "min_tokens", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty",
          "logit_bias", "presence_penalty", "frequency_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


@dataclass
class Call:
    """A checked completion or chat request: its prompts and the settings for generate()."""
    chat: bool
    prompts: list[str]
    settings: dict
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    seed: int | None
    logprobs: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


def _get(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {value!r}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
    return value


def parse_call(body, chat: bool, model_name: str, max_new_tokens: int) -> Call:
    """A request body -> Call, or ApiError(400/404) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", unknown[0])
    name = body.get("model")
    if name is not None and name != model_name:
        raise ApiError(404, f"the model '{name}' does not exist (this server serves '{model_name}')", "model",
                       code="model_not_found")
    if chat:
        prompts = [chat_prompt(body.get("messages"))]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        if body.get("echo"):
            raise ApiError(400, "'echo' is not supported", "echo")
        if body.get("suffix"):
            raise ApiError(400, "'suffix' is not supported", "suffix")
    number = (int, float)
    limit = f"an integer from 1 to {max_new_tokens}"
    max_tokens = _get(body, "max_tokens", (int,), 16, lambda v: 1 <= v <= max_new_tokens, limit)
    if chat:
        max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens, lambda v: 1 <= v <= max_new_tokens, limit)
    temperature = _get(body, "temperature", number, 1.0, lambda v: 0 <= v <= 100, "a number >= 0")
    top_p = _get(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= 64, "an integer from 1 to 64")
    top_k = _get(body, "top_k", (int,), 0, lambda v: v >= -1, "an integer >= 0 (0 or -1: off)")
    num_beams = _get(body, "num_beams", (int,), 1, lambda v: 1 <= v <= 64, "an integer from 1 to 64")
    settings = dict(max_new_tokens=max_tokens, num_return_sequences=n, num_beams=num_beams,
                    do_sample=temperature > 0, temperature=float(temperature) if temperature > 0 else 1.0,
                    top_p=float(top_p) if temperature > 0 else 1.0, top_k=max(top_k, 0) if temperature > 0 else 0,
                    min_new_tokens=_get(body, "min_tokens", (int,), 0, lambda v: 0 <= v <= max_tokens,
                                        "an integer from 0 to max_tokens"),
                    repetition_penalty=float(_get(body, "repetition_penalty", number, 1.0, lambda v: v > 0,
                                                  "a number > 0")),
                    no_repeat_ngram_size=_get(body, "no_repeat_ngram_size", (int,), 0, lambda v: v >= 0,
                                              "an integer >= 0"),
                    length_penalty=float(_get(body, "length_penalty", number, 1.0)))
    if n > 1 and temperature == 0 and n > num_beams:
        raise ApiError(400, "n > 1 needs sampling (temperature > 0) or num_beams >= n", "n")
    bias = _get(body, "logit_bias", (dict,), {})
    try:
        if bias:
            settings["sequence_bias"] = [[[int(t)], float(b)] for t, b in bias.items() if -100 <= float(b) <= 100]
            if len(settings["sequence_bias"]) != len(bias):
                raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, "'logit_bias' must map token ids to numbers from -100 to 100", "logit_bias") from None
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, number, 0):
            raise ApiError(400, f"'{name}' is not supported (use repetition_penalty)", name)
    if not chat and _get(body, "best_of", (int,), n) != n:
        raise ApiError(400, "'best_of' is not supported (use num_beams)", "best_of")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if chat:
        if _get(body, "logprobs", (bool,), False) or body.get("top_logprobs") is not None:
            raise ApiError(400, "logprobs are supported in /v1/completions only", "logprobs")
        logprobs = None
    else:
        logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "an integer from 0 to 5")
    if num_beams > 1 and (stream or logprobs is not None):
        raise ApiError(400, "beam search (num_beams > 1) returns whole outputs: no streaming, no logprobs", "num_beams")
    return Call(chat, prompts, settings, n, stream, bool(options.get("include_usage")), stop,
                _get(body, "seed", (int,), None), logprobs)


def chat_prompt(messages) -> str:
    """FLAN-T5 has no chat template: the prompt is the messages' contents, in order, joined by newlines."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, "message content parts must be text", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, "each message must have a string 'content'", "messages")
        parts.append(content)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- the worker

class Output:
    """One prompt's request in flight: its engine Request, the text of each of its n rows as it grows, and the
    events (deltas, then the end) that the HTTP side awaits: (index of the prompt, "delta", row, text) and
    (index, "done", error or None), in a queue shared by the call's prompts."""

    def __init__(self, server: "Server", call: Call, ids: list[int], seed: int | None, index: int,
                 events: asyncio.Queue):
        self.server, self.call = server, call
        self.loop = asyncio.get_running_loop()
        self.index, self.events = index, events
        self.prompt_tokens = len(ids)
        n = call.n
        hold = max(map(len, call.stop), default=1) - 1  # the start of a stop string is not sent early
        self.texts = [TextStream(server.tokenizer, hold) for _ in range(n)]
        self.final = [None] * n  # each row's text once it has ended
        self.reason = ["length"] * n
        self.tokens = [0] * n  # generated tokens per row
        self.logprobs = [[] for _ in range(n)]  # per row: (token id, log-prob, top ids, top log-probs)
        self.arrived, self.first = time.perf_counter(), None
        self.request = Request(ids, dict(call.settings), seed=seed,
                               logprobs=call.logprobs, on_step=self.on_step, on_done=self.on_done)

    def post(self, *event):  # (engine thread) delivered to the event loop after the step: Worker.flush
        self.server.worker.outbox.append((self.loop, self.events, (self.index, *event)))

    # engine thread
    def on_step(self, request: Request, tokens):
        if self.first is None:
            self.first = time.perf_counter()
        top = request.top_logprobs[-1] if request.top_logprobs else None
        for j, token in enumerate(tokens.tolist()):
            if self.final[j] is not None:  # ended earlier (the engine feeds it padding)
                continue
            self.tokens[j] += 1
            if top is not None:
                self.logprobs[j].append((token, float(top[0][j]), top[2][j].tolist(), top[1][j].tolist()))
            text = self.texts[j]
            if token != self.server.eos:
                text.add(token)
            cut = self.stop_at(text.text)  # (before any of the new text is released)
            if cut is not None or token == self.server.eos:
                self.final[j] = text.text if cut is None else text.text[:cut]
                delta = text.end(self.final[j])
                self.reason[j] = "stop"
                request.done[j] = True  # a stop string ends the row here, as </s> would
            else:
                delta = text.release()
            if delta:
                self.post("delta", j, delta)

    def stop_at(self, text: str):
        """Where the first stop string begins in text, or None."""
        hits = [i for i in (text.find(s) for s in self.call.stop) if i >= 0]
        return min(hits) if hits else None

    def on_done(self, request: Request):
        if request.error is None and request.rows is not None:
            for j in range(self.call.n):
                if self.final[j] is not None:
                    continue
                stream = self.texts[j]
                if not stream.ids:  # beam search: whole rows at the end
                    row = [t for t in request.rows[j, 1:].tolist() if t != self.server.pad]
                    self.tokens[j] = len(row)
                    stream.ids, stream.text = row, self.server.tokenizer.decode(row)
                    self.reason[j] = "stop" if self.server.eos in row else "length"
                cut = self.stop_at(stream.text)
                if cut is not None:
                    self.reason[j] = "stop"
                self.final[j] = stream.text if cut is None else stream.text[:cut]
                delta = stream.end(self.final[j])
                if delta:
                    self.post("delta", j, delta)
        self.server.metrics.finished(self)
        self.post("done", request.error)


class Worker:
    """The loop that owns the model, in the process' main thread (torch's CPU thread pool runs ~2x slower from other
    threads here; the HTTP side runs in a thread of its own): it takes requests from its inbox and runs the
    engine's steps while any are in flight. A step that fails as a whole (not one request's) fails the requests in
    flight, and the loop goes on."""

    def __init__(self, engine: Engine, metrics):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: list = []  # (event loop, queue, event) posted during a step
        self.alive = True  # until run() ends

    def queued(self) -> int:
        return self.inbox.qsize() + len(self.engine.waiting)

    def run(self, until):
        """Step while requests are in flight; return once until() is true and none are left."""
        try:
            while True:
                if not self.engine.busy:
                    if until() and self.inbox.empty():
                        return
                    try:
                        self.engine.submit(self.inbox.get(timeout=0.05))
                    except queue.Empty:
                        continue
                while not self.inbox.empty():
                    self.engine.submit(self.inbox.get_nowait())
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001 - the whole step failed: its requests get the error
                    self.engine.fail_all(e)
                self.metrics.step(self.engine.step_rows + len(self.engine.beam_requests))
                self.flush()
        except BaseException:
            self.alive = False
            raise

    def flush(self):
        """Hand the step's events to the event loop in one call (one wake-up a step, not one per token)."""
        if self.outbox:
            events, self.outbox = self.outbox, []
            events[0][0].call_soon_threadsafe(deliver, events)


def deliver(events):
    for _, queue_, event in events:
        queue_.put_nowait(event)


# ---------------------------------------------------------------------------------------------------- metrics

class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = list(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def render(self, name: str, help: str) -> list[str]:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                        f"{name}_count {self.count}"]


class Metrics:
    """Prometheus text: requests by status, queue size, running rows, batch size, prompt and generated tokens,
    time to first token and per-token latency."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: dict[int, int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.batch = Histogram([1, 2, 4, 8, 16, 32, 64, 128])
        self.ttft = Histogram([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.tpot = Histogram([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1])

    def request(self, status: int):
        with self.lock:
            self.status[status] = self.status.get(status, 0) + 1

    def step(self, rows: int):
        with self.lock:
            self.batch.observe(rows)

    def finished(self, out: Output):
        now = time.perf_counter()
        with self.lock:
            self.prompt_tokens += out.prompt_tokens
            tokens = sum(out.tokens)
            self.generated_tokens += tokens
            first = out.first or now
            self.ttft.observe(first - out.arrived)
            if max(out.tokens, default=0) > 1:
                self.tpot.observe((now - first) / (max(out.tokens) - 1))

    def render(self, worker: Worker) -> str:
        with self.lock:
            lines = ["# HELP nanoflant5_requests_total HTTP requests to /v1 routes by status",
                     "# TYPE nanoflant5_requests_total counter"]
            lines += [f'nanoflant5_requests_total{{status="{s}"}} {c}' for s, c in sorted(self.status.items())]
            for name, kind, help, value in [
                    ("queue_size", "gauge", "requests waiting to join the batch", worker.queued()),
                    ("running_rows", "gauge", "rows in the running batch", worker.engine.rows),
                    ("prompt_tokens_total", "counter", "prompt tokens of finished requests", self.prompt_tokens),
                    ("generation_tokens_total", "counter", "tokens generated", self.generated_tokens)]:
                lines += [f"# HELP nanoflant5_{name} {help}", f"# TYPE nanoflant5_{name} {kind}",
                          f"nanoflant5_{name} {value}"]
            lines += self.batch.render("nanoflant5_batch_size", "rows decoded per step")
            lines += self.ttft.render("nanoflant5_time_to_first_token_seconds", "from arrival to the first token")
            lines += self.tpot.render("nanoflant5_time_per_output_token_seconds", "after the first token")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the app

class Server:
    """The model, its tokenizer, the engine's worker, and what the routes share."""

    def __init__(self, model, tokenizer: Tokenizer, name: str, max_batch_size: int = 32, max_queue: int = 128,
                 max_input_length: int = 512, max_new_tokens: int = 512):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_queue, self.max_input_length, self.max_new_tokens = max_queue, max_input_length, max_new_tokens
        self.eos, self.pad = model.config.eos_token_id, model.config.pad_token_id
        self.engine = Engine(model, max_batch_size, max_new_tokens)
        self.metrics = Metrics()
        self.worker = Worker(self.engine, self.metrics)
        self.draining = False

    def check_open(self):
        if self.draining or not self.worker.alive:
            raise ApiError(503, "the server is shutting down" if self.draining else "the decoding loop has stopped",
                           kind="server_error", code="unavailable")

    def start(self, call: Call) -> list[Output]:
        """Check and queue one request per prompt (400 for a bad one, 429 when the queue is full)."""
        self.check_open()
        if self.worker.queued() + len(call.prompts) > self.max_queue:
            raise ApiError(429, f"the queue is full ({self.max_queue} requests): try again shortly",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        outs, events = [], asyncio.Queue()
        for i, prompt in enumerate(call.prompts):
            ids = self.tokenizer.encode_ids(prompt)
            if len(ids) > self.max_input_length:
                raise ApiError(400, f"the prompt is {len(ids)} tokens, more than {self.max_input_length}",
                               "messages" if call.chat else "prompt")
            seed = None if call.seed is None else call.seed + i
            out = Output(self, call, ids, seed, i, events)
            try:
                self.engine.check(out.request)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            outs.append(out)
        for out in outs:
            self.worker.inbox.put(out.request)
        return outs

    def cancel(self, outs: list[Output]):
        for out in outs:
            self.engine.cancel(out.request)


class CountStatus:
    """ASGI middleware: counts the responses to /v1 routes by status (a plain ASGI one: FastAPI's @middleware("http")
    would pass every streamed chunk through a memory stream of its own)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="nanoflant5", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind="invalid_request_error").body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    app.add_middleware(CountStatus, metrics=server.metrics)

    @app.get("/health")
    async def health():
        if server.draining or not server.worker.alive:
            return JSONResponse({"status": "draining" if server.draining else "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.worker), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "nanoflant5"}]}

    async def handle(http: HttpRequest, chat: bool):
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        call = parse_call(body, chat, server.name, server.max_new_tokens)
        outs = server.start(call)
        if call.stream:
            return StreamingResponse(stream(call, outs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watch = asyncio.create_task(disconnect(http, outs))
        try:
            errors = await finish(outs)
        finally:
            watch.cancel()
            server.cancel(outs)
        for e in errors:
            if e is not None:
                raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        return response(call, outs)

    async def finish(outs: list[Output]) -> list:
        """Wait for every prompt's end (the texts are then in out.final): None, or the error each failed with."""
        errors, remaining = [None] * len(outs), len(outs)
        while remaining:
            i, kind, *rest = await outs[0].events.get()
            if kind == "done":
                errors[i], remaining = rest[0], remaining - 1
        return errors

    async def disconnect(http: HttpRequest, outs: list[Output]):
        """When the client goes away (ASGI's receive() answers http.disconnect), its requests are cancelled: their
        rows are freed at the next step."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        server.cancel(outs)
        for out in outs:
            out.events.put_nowait((out.index, "done", None))

    async def stream(call: Call, outs: list[Output]):
        """Server-sent events: a chunk per delta as the engine makes it, one per ended row, then [DONE]."""
        try:
            if call.chat:
                for j in range(call.n):
                    yield sse(chunk(call, [dict(index=j, delta={"role": "assistant", "content": ""},
                                                finish_reason=None)]))
            remaining, events = len(outs), outs[0].events
            while remaining:
                # what has arrived since the last write goes out in one write, a row's deltas merged into one event
                batch, parts, pending = [await events.get()], [], {}
                while not events.empty():
                    batch.append(events.get_nowait())
                for i, kind, *rest in batch + [(None, "flush")]:
                    if kind == "delta":
                        pending[i, rest[0]] = pending.get((i, rest[0]), "") + rest[1]
                        continue
                    for (p, j), text in pending.items():
                        parts.append(sse(chunk(call, [choice(call, outs[p], p * call.n + j, text, None, True)])))
                    pending = {}
                    if kind == "flush":
                        break
                    remaining -= 1
                    if rest[0] is not None:
                        error = ApiError(500, f"generation failed: {type(rest[0]).__name__}: {rest[0]}",
                                         kind="server_error")
                        parts.append(sse(error.body()))
                        continue
                    for j in range(call.n):
                        parts.append(sse(chunk(call, [choice(call, outs[i], i * call.n + j, "", outs[i].reason[j],
                                                             True)])))
                yield "".join(parts)
            if call.include_usage:
                yield sse(chunk(call, [], usage(outs)))
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: its rows are freed at the next step
            server.cancel(outs)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, chat=True)

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(call: Call, choices: list, use=None) -> dict:
        kind = "chat.completion.chunk" if call.chat else "text_completion"
        data = {"id": ("chatcmpl-" if call.chat else "cmpl-") + call.id, "object": kind, "created": call.created,
                "model": server.name, "choices": choices}
        if use is not None:
            data["usage"] = use
        return data

    def choice(call: Call, out: Output, index: int, text: str, reason, stream: bool = False) -> dict:
        if call.chat:
            key = "delta" if stream else "message"
            return {"index": index, key: ({"content": text} if stream else {"role": "assistant", "content": text}),
                    "finish_reason": reason}
        j = index % call.n
        logprobs = None if call.logprobs is None or stream else completion_logprobs(out, j, call.logprobs)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def completion_logprobs(out: Output, j: int, k: int) -> dict:
        """OpenAI's legacy completion logprobs for row j, up to its end (a stop string cuts the text, not these)."""
        token = server.tokenizer.token_text
        tokens, lps, tops, offsets, offset = [], [], [], [], 0
        for t, lp, top_ids, top_lps in out.logprobs[j]:
            tokens.append(token(t))
            lps.append(lp)
            tops.append({token(i): v for i, v in zip(top_ids[:k], top_lps[:k])} if k else None)
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def usage(outs: list[Output]) -> dict:
        prompt = sum(out.prompt_tokens for out in outs)
        completion = sum(sum(out.tokens) for out in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(call: Call, outs: list[Output]) -> dict:
        choices = [choice(call, out, i * call.n + j, out.final[j] or "", out.reason[j])
                   for i, out in enumerate(outs) for j in range(call.n)]
        data = chunk(call, choices, usage(outs))
        data["object"] = "chat.completion" if call.chat else "text_completion"
        return data

    return app


def serve(model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
          max_queue: int = 128, max_input_length: int = 512, max_new_tokens: int = 512, dtype=torch.float32,
          device: str = "cpu", served_name: str | None = None, quantize: str | None = None, adapter=None) -> int:
    """Load the model (quantize, adapter: see T5.from_pretrained) and serve it until SIGTERM/SIGINT, which stop new
    requests (503), finish those in flight, and return 0."""
    import uvicorn

    from .model import T5

    model = T5.from_pretrained(model_name, dtype=dtype, device=device, quantize=quantize, adapter=adapter)
    server = Server(model, Tokenizer.from_pretrained(model_name), served_name or str(model_name), max_batch_size,
                    max_queue, max_input_length, max_new_tokens)
    app = create_app(server)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)
    web = uvicorn.Server(config)  # in a thread: it installs no signal handlers there
    thread = threading.Thread(target=web.run, name="nanoflant5-http", daemon=True)

    def on_signal(sig, frame):
        """First SIGTERM/SIGINT: drain (new requests and /health answer 503) while the requests in flight finish;
        a second one stops at once."""
        if server.draining:
            web.should_exit = web.force_exit = True
            raise KeyboardInterrupt  # out of the engine's loop: the command exits 130
        server.draining = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread.start()
    server.worker.run(until=lambda: server.draining or not thread.is_alive())
    web.should_exit = True  # uvicorn's own shutdown waits for the last responses to go out; the loop serves any
    server.worker.run(until=lambda: not thread.is_alive())  # request that got in just before draining began
    thread.join()
    if not web.started:
        raise OSError(f"could not serve on {host}:{port} (in use?)")
    return 0
