"""Continuous batching (engine.py): every request's rows equal model.generate() on its prompt alone, whatever else
is in flight, in float64."""

import pytest
import torch

from helpers import random_batch
from nanoflant5.engine import Engine, Request
from nanoflant5.load import load_model

LENGTHS = [7, 3, 12, 5, 20, 9, 4, 15, 6, 11, 8, 2]
SETTINGS = [
    dict(max_new_tokens=24),
    dict(max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9),
    dict(max_new_tokens=30, min_new_tokens=10),
    dict(max_new_tokens=20, do_sample=True, top_p=0.8, num_return_sequences=2),
    dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, length_penalty=0.5),
    dict(max_new_tokens=24, repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(max_new_tokens=8),
    dict(max_new_tokens=20, num_beams=2, early_stopping=True),
    dict(max_new_tokens=28, do_sample=True, temperature=1.3, num_return_sequences=3),
    dict(max_new_tokens=18, min_new_tokens=18),
    dict(max_new_tokens=22, sequence_bias=[[[5], 2.0]]),
    dict(max_new_tokens=1),
]


@pytest.fixture(scope="module")
def model(checkpoint):
    folder, _ = checkpoint("gated-gelu-untied")
    return load_model(folder, dtype=torch.float64)


def prompts():
    ids, mask = random_batch(96, LENGTHS, seed=5)
    return [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]


def alone(model, ids, settings, seed):
    return model.generate(torch.tensor([ids]), seed=seed, **settings)


def test_requests_arriving_at_different_steps_get_what_generate_gives_them_alone(model):
    """12 requests of mixed settings (greedy, sampling with seeds and several sequences, beams, penalties, lengths),
    arriving 0-3 steps apart into a batch of at most 6 rows: rows wait, join, leave and are reused."""
    engine = Engine(model, max_batch_size=6, max_new_tokens=32)
    requests, steps = [], 0
    peak = 0
    for i, (ids, settings) in enumerate(zip(prompts(), SETTINGS)):
        requests.append(engine.submit(Request(ids, settings, seed=100 + i)))
        for _ in range(i % 4):
            engine.step()
            steps += 1
            peak = max(peak, engine.rows)
    while engine.busy:
        engine.step()
        peak = max(peak, engine.rows)
    assert peak == 6  # the batch was full at times, so requests waited and slots were reused
    for r, ids, settings in zip(requests, prompts(), SETTINGS):
        want = alone(model, ids, settings, seed=100 + r.id)
        assert r.error is None and torch.equal(r.rows, want), (settings, r.rows, want)
    assert len({r.rows.shape[1] for r in requests}) > 4  # outputs end at different lengths


def test_streamed_tokens_and_logprobs(model):
    """on_step gets each step's tokens; they make up the final rows; logprobs are the model's log-probabilities of
    the chosen tokens, whose sum is generate(return_scores=True)'s score."""
    engine = Engine(model, max_batch_size=4, max_new_tokens=32)
    ids = prompts()[:3]
    seen = {}
    requests = [engine.submit(Request(p, dict(max_new_tokens=20), logprobs=3,
                                      on_step=lambda r, t: seen.setdefault(r.id, []).append(t.clone())))
                for p in ids]
    engine.run_until_idle()
    for r, p in zip(requests, ids):
        streamed = torch.stack(seen[r.id], 1)
        assert torch.equal(r.rows[:, 1:], streamed)
        rows, score = model.generate(torch.tensor([p]), max_new_tokens=20, return_scores=True)
        assert torch.equal(r.rows, rows)
        chosen = torch.stack([lp[0] for lp in r.top_logprobs], 1)  # (1, steps)
        alive = r.rows[:, 1:] != 0
        torch.testing.assert_close(chosen[alive].sum(), score[0])
        assert all(lp[1].shape == (1, 3) and bool((lp[1][:, :1] >= lp[0][:, None]).all()) for lp in r.top_logprobs)


def test_cancelled_request_frees_its_rows_and_others_go_on(model):
    engine = Engine(model, max_batch_size=3, max_new_tokens=32)
    ids = prompts()
    keep = [engine.submit(Request(ids[0], dict(max_new_tokens=30, min_new_tokens=30)))]
    gone = engine.submit(Request(ids[1], dict(max_new_tokens=30, min_new_tokens=30, do_sample=True,
                                              num_return_sequences=2)))
    engine.step()
    engine.step()
    late = engine.submit(Request(ids[2], dict(max_new_tokens=10)))
    engine.step()
    assert late.t == 0 and engine.rows == 3  # no room yet
    engine.cancel(gone)
    engine.step()
    assert gone.rows is None and late.t == 1 and engine.rows == 2  # freed at the next step, taken by `late`
    engine.run_until_idle()
    for r, p, s in [(keep[0], ids[0], dict(max_new_tokens=30, min_new_tokens=30)),
                    (late, ids[2], dict(max_new_tokens=10))]:
        assert torch.equal(r.rows, alone(model, p, s, None))


@pytest.mark.parametrize("logprobs", [None, 2])  # greedy steps through the int8 screen, or the full logits
def test_a_failing_request_fails_alone(model, monkeypatch, logprobs):
    import nanoflant5.engine as E

    engine = Engine(model, max_batch_size=4, max_new_tokens=32)
    ids = prompts()
    good = engine.submit(Request(ids[0], dict(max_new_tokens=20), logprobs=logprobs))
    bad = engine.submit(Request(ids[1], dict(max_new_tokens=20, repetition_penalty=1.2)))
    real_next, real_process = E.next_tokens, E.process_scores

    def broken(real):
        def call(out, tokens, t, g, *a, **kw):
            if g.repetition_penalty != 1.0 and t == 3:
                raise RuntimeError("boom")
            return real(out, tokens, t, g, *a, **kw)
        return call

    monkeypatch.setattr(E, "next_tokens", broken(real_next))
    monkeypatch.setattr(E, "process_scores", broken(real_process))
    engine.run_until_idle()
    assert isinstance(bad.error, RuntimeError) and bad.rows is None
    assert good.error is None and torch.equal(good.rows, alone(model, ids[0], dict(max_new_tokens=20), None))


def test_greedy_steps_go_through_the_screen(model, monkeypatch):
    """Batches of greedy requests take the output layer through the int8 screen (speed.OutputScreen), with each
    request's processors applied to its own rows; the rows are still generate()'s."""
    import nanoflant5.speed as S

    calls = []
    argmax = S.OutputScreen.argmax
    monkeypatch.setattr(S.OutputScreen, "argmax", lambda *a: calls.append(1) or argmax(*a))
    engine = Engine(model, max_batch_size=8, max_new_tokens=32)
    settings = [dict(max_new_tokens=24), dict(max_new_tokens=30, min_new_tokens=12),
                dict(max_new_tokens=24, repetition_penalty=1.5, no_repeat_ngram_size=2),
                dict(max_new_tokens=22, sequence_bias=[[[5], 2.0]]), dict(max_new_tokens=28, bad_words_ids=[[7, 9]]),
                dict(max_new_tokens=20, num_beams=2)]
    requests = []
    for i, (p, kw) in enumerate(zip(prompts(), settings)):
        requests.append(engine.submit(Request(p, kw)))
        engine.step()
    engine.run_until_idle()
    assert len(calls) >= 20
    for r, p, kw in zip(requests, prompts(), settings):
        assert torch.equal(r.rows, alone(model, p, kw, None)), kw


def test_bad_requests_are_refused_with_one_line(model):
    engine = Engine(model, max_batch_size=4, max_new_tokens=16)
    for settings, match in [(dict(max_new_tokens=17), "at most 16 new tokens"),
                            (dict(max_new_tokens=8, num_return_sequences=5, do_sample=True), "at most 4 sequences"),
                            (dict(max_new_tokens=8, temperature=-1.0, do_sample=True), "temperature")]:
        with pytest.raises(ValueError, match=match):
            engine.submit(Request([5, 6, 1], settings))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], {}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(Request([5, 96], {}))
    assert not engine.busy


def test_float32_steps_take_kept_panel_copies(checkpoint, monkeypatch):
    """float32 on CPU: steps of 5 or more rows run the decoder's linears on panel_linear's copies of the weights
    (fast_linears' `panels`), made on the first such step and kept for every later step and row count; each request
    gets the rows of generate() on its prompt alone with torch's kernels."""
    import nanoflant5.speed as S
    from nanoflant5 import kernels

    if not kernels.available():
        pytest.skip("no C++ compiler to build the kernels")
    folder, _ = checkpoint("gated-gelu-untied")
    model32 = load_model(folder, dtype=torch.float32)
    monkeypatch.setattr(S, "PACKER", "panels")
    packs = []
    monkeypatch.setattr(S, "pack_panels", lambda w, rows=0, pack=S.pack_panels: packs.append(w) or pack(w))
    settings = [dict(max_new_tokens=20, min_new_tokens=k) for k in (4, 20, 9, 14, 20, 6)]
    settings[1] = dict(max_new_tokens=20, num_beams=2)
    engine = Engine(model32, max_batch_size=8, max_new_tokens=24)
    for _ in range(2):
        requests = [engine.submit(Request(p, kw)) for p, kw in zip(prompts(), settings)]
        engine.run_until_idle()
        assert len(packs) == 6 * len(model32.decoder.blocks)  # the greedy steps' linears, once
        monkeypatch.setattr(S, "KERNELS", False)
        for r, p, kw in zip(requests, prompts(), settings):
            assert torch.equal(r.rows, alone(model32, p, kw, None)), kw
        monkeypatch.setattr(S, "KERNELS", True)
