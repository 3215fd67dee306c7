"""`nanoflant5 serve` as clients see it: a server subprocess on 127.0.0.1 (float64, a random model with FLAN-T5's real
tokenizer), called with the openai package and httpx. Every answer is compared with model.generate() on that prompt
alone in this process; request counts and times are bounded, and every server started here is stopped by its PID."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import checkpoint_with_tokenizer, free_port  # noqa: E402
from nanoflant5 import Tokenizer  # noqa: E402
from nanoflant5.load import load_model  # noqa: E402

WORDS = ("the cat sat on a mat while seven quick brown foxes jumped over lazy dogs near old river banks and "
         "translate summarize answer question German French").split()


class Running:
    """A server subprocess; stop() ends it (SIGTERM, then SIGKILL) by its PID."""

    def __init__(self, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(folder).parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanoflant5", "serve", "--model", str(folder),
                                      "--port", str(self.port), "--dtype", "float64", "--served-model-name", "t5",
                                      *flags], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not start: " + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("served"), seed=4)


@pytest.fixture(scope="module")
def server(folder):
    running = Running(folder, "--max-batch-size", "6", "--max-queue", "16", "--max-new-tokens", "512")
    yield running
    running.stop()
    assert running.proc.returncode == 0


@pytest.fixture(scope="module")
def reference(folder):
    model, tok = load_model(folder, dtype=torch.float64), Tokenizer(folder)

    def complete(prompt: str, max_tokens=16, temperature=1.0, top_p=1.0, n=1, stop=(), seed=None, top_k=0,
                 min_tokens=0, num_beams=1, **extra):
        """(texts, finish reasons) as the server should answer: model.generate() on the prompt alone."""
        kw = dict(max_new_tokens=max_tokens, min_new_tokens=min_tokens, num_return_sequences=n, num_beams=num_beams,
                  **extra)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        rows = model.generate(torch.tensor([tok.encode_ids(prompt)]), seed=seed, **kw)
        texts, reasons = [], []
        for row in rows:
            text = tok.decode(row)
            cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
            texts.append(text[:min(cuts)] if cuts else text)
            reasons.append("stop" if cuts or 1 in row[1:].tolist() else "length")
        return texts, reasons

    return complete


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 9))


MIXED = [
    dict(max_tokens=24, temperature=0),
    dict(max_tokens=30, temperature=0.9, seed=1),
    dict(max_tokens=20, temperature=0.8, top_p=0.7, n=2, seed=5),
    dict(max_tokens=16, temperature=0, num_beams=3, n=2),
    dict(max_tokens=40, temperature=0, min_tokens=12),
    dict(max_tokens=24, temperature=0, repetition_penalty=1.4, no_repeat_ngram_size=2),
    dict(max_tokens=32, temperature=0, stop=["e", "an"]),
    dict(max_tokens=28, temperature=1.2, top_k=40, seed=9, stop=[" "]),
]


def test_concurrent_mixed_requests_equal_generate_alone(server, reference):
    """48 completions, 16 at a time, arriving at different moments, mixed settings (greedy, seeded sampling with
    n = 1 or 2, beams, min_tokens, penalties, stop strings), some streamed: each equals generate() on its prompt
    alone, text and finish_reason, whatever else was in flight."""
    jobs = [(prompt(i), dict(MIXED[i % len(MIXED)]), i % 3 == 0 and MIXED[i % len(MIXED)].get("num_beams", 1) == 1)
            for i in range(48)]

    async def one(client, limit, i, text, body, stream):
        async with limit:
            await asyncio.sleep(0.01 * (i % 5))
            if not stream:
                r = await client.post("/v1/completions", json=dict(body, prompt=text, model="t5"))
                assert r.status_code == 200, r.text
                return sorted((c["index"], c["text"], c["finish_reason"]) for c in r.json()["choices"])
            parts, reasons = {}, {}
            async with client.stream("POST", "/v1/completions", json=dict(body, prompt=text, stream=True)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for c in json.loads(line[6:])["choices"]:
                        parts[c["index"]] = parts.get(c["index"], "") + c["text"]
                        reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
            return sorted((i, parts[i], reasons[i]) for i in parts)

    async def run():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, limit, i, *job) for i, job in enumerate(jobs)))

    got = asyncio.run(run())
    for (text, body, _), answer in zip(jobs, got):
        texts, reasons = reference(text, **body)
        assert answer == [(j, t, r) for j, (t, r) in enumerate(zip(texts, reasons))], body
    assert len({t for answer in got for _, t, _ in answer}) > 20  # outputs differ from one another


def test_openai_client(server, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["t5"]
    r = client.completions.create(model="t5", prompt=prompt(1), max_tokens=20, temperature=0)
    assert [r.choices[0].text] == reference(prompt(1), max_tokens=20, temperature=0)[0]
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # a list of prompts; n with a seed (repeatable, and as generate(seed=...) draws)
    r = client.completions.create(model="t5", prompt=[prompt(2), prompt(3)], max_tokens=12, temperature=0.7, n=2,
                                  seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = reference(prompt(2), max_tokens=12, temperature=0.7, n=2, seed=11)[0]
    want += reference(prompt(3), max_tokens=12, temperature=0.7, n=2, seed=12)[0]  # the i-th prompt: seed + i
    assert [c.text for c in r.choices] == want
    again = client.completions.create(model="t5", prompt=[prompt(2), prompt(3)], max_tokens=12, temperature=0.7,
                                      n=2, seed=11)
    assert [c.text for c in again.choices] == want
    # chat: the messages' contents joined by newlines
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt(4)}]
    r = client.chat.completions.create(model="t5", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert [r.choices[0].message.content] == reference("Answer briefly.\n" + prompt(4), max_tokens=16,
                                                       temperature=0)[0]
    # streaming: the chunks add up to the whole answer
    chunks = client.chat.completions.create(model="t5", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    chunks = list(client.completions.create(model="t5", prompt=prompt(5), max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(prompt(5), max_tokens=24,
                                                                               temperature=0)[0][0]
    assert chunks[-1].usage.completion_tokens > 0
    # logprobs: the model's log-probabilities of the chosen tokens, best first in top_logprobs
    r = client.completions.create(model="t5", prompt=prompt(6), max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))


def test_errors_in_openais_shape(server):
    def post(body, path="/v1/completions", **kw):
        return httpx.post(server.url + path, timeout=30, **({"content": body} if isinstance(body, str) else
                                                            {"json": body}), **kw)

    for body, status, param in [("{not json", 400, None), ([1, 2], 400, None),
                                (dict(prompt="hi", temperature=-1), 400, "temperature"),
                                (dict(prompt="hi", max_tokens=0), 400, "max_tokens"),
                                (dict(prompt="hi", max_tokens=513), 400, "max_tokens"),
                                (dict(prompt="hi", n=2, temperature=0), 400, "n"),
                                (dict(prompt="hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
                                (dict(prompt="hi", logprobs=6), 400, "logprobs"),
                                (dict(prompt="hi", num_beams=2, stream=True), 400, "num_beams"),
                                (dict(prompt="hi", frequency_penalty=0.5), 400, "frequency_penalty"),
                                (dict(prompt="hi", unknown_field=1), 400, "unknown_field"),
                                (dict(prompt=[]), 400, "prompt"),
                                (dict(prompt=" ".join(["word"] * 600)), 400, "prompt"),
                                (dict(prompt="hi", model="gpt-4"), 404, "model")]:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    r = post(dict(messages=[{"role": "user"}]), "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("nanoflant5_requests_total", "nanoflant5_queue_size", "nanoflant5_running_rows",
                 "nanoflant5_batch_size_bucket", "nanoflant5_prompt_tokens_total",
                 "nanoflant5_generation_tokens_total", "nanoflant5_time_to_first_token_seconds_bucket",
                 "nanoflant5_time_per_output_token_seconds_bucket"):
        assert name in metrics
    assert 'nanoflant5_requests_total{status="400"}' in metrics


def test_overload_gets_429_and_the_rest_is_served(server, reference):
    """40 long requests at once into 6 rows and a queue of 16: some are refused with 429 and Retry-After, every
    accepted one is answered in full."""
    body = dict(prompt=prompt(7), max_tokens=200, min_tokens=200, temperature=0)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(40)))

    answers = asyncio.run(run())
    refused = [r for r in answers if r.status_code == 429]
    served = [r for r in answers if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 40
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in refused)
    want = reference(prompt(7), max_tokens=200, min_tokens=200, temperature=0)[0][0]
    assert all(r.json()["choices"][0]["text"] == want for r in served)


def metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_a_client_that_goes_away_frees_its_rows(server):
    before = metric(server, "nanoflant5_generation_tokens_total")
    for stream in (True, False):
        body = dict(prompt=prompt(8), max_tokens=500, min_tokens=500, temperature=0, stream=stream)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            if stream:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    assert next(line for line in lines if line.startswith("data: "))
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/completions", json=body, timeout=0.1)
        deadline = time.time() + 10
        while metric(server, "nanoflant5_running_rows") and time.time() < deadline:
            time.sleep(0.05)
        assert metric(server, "nanoflant5_running_rows") == 0
    assert metric(server, "nanoflant5_generation_tokens_total") - before < 2 * 500  # stopped before their ends


def test_sigterm_drains_then_exits_0(folder, reference):
    running = Running(folder, "--max-new-tokens", "400")
    body = dict(prompt=prompt(9), max_tokens=400, min_tokens=400, temperature=0, stream=True)
    text, finished = [], threading.Event()

    def read():
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    finished.set()
                elif line.startswith("data: "):
                    text.extend(c["text"] for c in json.loads(line[6:])["choices"])

    reader = threading.Thread(target=read)
    try:
        reader.start()
        while not text and reader.is_alive():
            time.sleep(0.01)
        os.kill(running.proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        assert httpx.get(running.url + "/health").status_code == 503
        r = httpx.post(running.url + "/v1/completions", json=dict(prompt="hi"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        reader.join(timeout=60)
        assert finished.is_set() and "".join(text) == reference(prompt(9), max_tokens=400, min_tokens=400,
                                                                 temperature=0)[0][0]
        assert running.proc.wait(timeout=30) == 0
    finally:
        running.stop()
