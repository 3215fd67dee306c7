"""Sampling, penalties, n-gram blocking, checkpoint defaults, scoring and streaming — against transformers."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import make_checkpoint, random_batch, random_labels, reference
from nanoflant5.load import load_model

LENGTHS = [7, 3, 12, 5, 20, 9]


@pytest.fixture(scope="module")
def pair(checkpoint):
    folder, ref = checkpoint("gated-gelu-untied")
    return load_model(folder, dtype=torch.float64), ref


def same_as_transformers(model, ref, ids, mask, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(seed)
    got = model.generate(ids, mask, **kw)
    return got.shape == want.shape and torch.equal(got, want)


def test_penalty_grid_matches_transformers(pair):
    """num_beams x length_penalty x early_stopping x num_return_sequences x repetition_penalty x
    no_repeat_ngram_size x min_new_tokens: every 7th point of the grid, and greedy with every penalty."""
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=11)
    grid = [dict(num_beams=nb, length_penalty=lp, early_stopping=es, num_return_sequences=nrs,
                 repetition_penalty=rp, no_repeat_ngram_size=ng, min_new_tokens=mn)
            for nb, lp, es, nrs, rp, ng, mn in itertools.product(
                [1, 2, 4], [1.0, 0.0, 2.0], [False, True, "never"], [1, 2], [1.0, 1.4, 0.8], [0, 1, 2, 3], [0, 6])
            if nrs <= nb and (nb > 1 or (lp == 1.0 and es is False))]
    checked = [kw for i, kw in enumerate(grid) if i % 7 == 0 or kw["num_beams"] == 1]
    assert len(checked) > 80
    for kw in checked:
        assert same_as_transformers(model, ref, ids, mask, max_new_tokens=20, **kw), kw


def test_banned_tokens_match_transformers(pair):
    """bad_words_ids (single tokens, and pairs and triples taken from the unconstrained output, so that they would
    occur; [eos] alone, which transformers ignores), suppress_tokens and begin_suppress_tokens: transformers' rows
    for greedy (through the int8 screen, and compiled), beam search and sampling, and no banned sequence in them;
    bad values refused."""
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=12)
    free = model.generate(ids, mask, max_new_tokens=16)
    row = free[1, 1:].tolist()  # the longest row
    settings = [
        dict(bad_words_ids=[[row[0]], [row[3], row[4]], free[3, 2:5].tolist(), [1]]),
        dict(suppress_tokens=[row[1], row[2], 5]),
        dict(begin_suppress_tokens=free[:, 1].tolist(), bad_words_ids=[[free[5, 3].item(), free[5, 4].item()]]),
    ]
    for kw in settings:
        for extra in [dict(), dict(num_beams=3, num_return_sequences=2), dict(min_new_tokens=4),
                      dict(do_sample=True, top_k=0)]:
            assert same_as_transformers(model, ref, ids, mask, seed=3, max_new_tokens=16, **kw, **extra), (kw, extra)
        got = model.generate(ids, mask, max_new_tokens=16, **kw)
        assert torch.equal(got, model.generate(ids, mask, max_new_tokens=16, compile=True, **kw))
        assert not torch.equal(got, free)
        text = [r[1:].tolist() for r in got]
        for seq in kw.get("bad_words_ids", []):
            if seq != [1]:
                assert not any(r[i:i + len(seq)] == seq for r in text for i in range(len(r))), seq
        assert not any(set(r) & set(kw.get("suppress_tokens", [])) for r in text)
        assert not set(got[:, 1].tolist()) & set(kw.get("begin_suppress_tokens", []))
    for bad in [dict(bad_words_ids=[]), dict(bad_words_ids=[[3], []]), dict(bad_words_ids=[3]),
                dict(suppress_tokens=[-1]), dict(begin_suppress_tokens=[2.0]), dict(suppress_tokens=[96])]:
        with pytest.raises(ValueError, match="bad_words_ids|suppress_tokens"):
            model.generate(ids, mask, max_new_tokens=4, **bad)


def test_sequence_bias_matches_transformers(pair):
    """sequence_bias, as a list of pairs and as a dict (single tokens, and pairs taken from the unconstrained
    output; a bias on a token twice, the later winning): transformers' rows for greedy (through the int8 screen, and
    compiled), beam search and sampling; the biases change the rows; bad values are refused."""
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=12)
    free = model.generate(ids, mask, max_new_tokens=16)
    row = free[1, 1:].tolist()
    pairs = [[[row[0]], -30.0], [[row[3], row[4]], -4.0], [free[3, 2:4].tolist(), 3.0], [[50], 5.0], [[50], 1.5]]
    for bias in (pairs, {tuple(seq): b for seq, b in pairs}):
        for extra in [dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=0)]:
            kw = dict(max_new_tokens=16, sequence_bias=bias, **extra)
            assert same_as_transformers(model, ref, ids, mask, seed=3, **kw), (bias, extra)
        got = model.generate(ids, mask, max_new_tokens=16, sequence_bias=bias)
        assert not torch.equal(got, free)
        assert torch.equal(got, model.generate(ids, mask, max_new_tokens=16, compile=True, sequence_bias=bias))
    for bad in [[], [[[3], "x"]], [[[], 1.0]], [[3, 1.0]], {(96,): 1.0}]:
        with pytest.raises(ValueError, match="sequence_bias"):
            model.generate(ids, mask, max_new_tokens=4, sequence_bias=bad)


@pytest.mark.parametrize("kw", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.6), dict(temperature=1.5, top_k=20, top_p=0.9),
    dict(top_k=0, num_return_sequences=3), dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(num_beams=3, top_p=0.8), dict(num_beams=2, num_return_sequences=2, temperature=0.5),
    dict(min_p=0.1), dict(typical_p=0.7), dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.1),
    dict(temperature=0.8, top_k=30, top_p=0.95, min_p=0.05, typical_p=0.9, epsilon_cutoff=3e-3, eta_cutoff=3e-3),
    dict(num_beams=2, min_p=0.2, typical_p=0.5, epsilon_cutoff=0.05, eta_cutoff=0.05),
])
def test_sampling_draws_what_transformers_draws(pair, kw):
    """With the same torch seed, sampling consumes the random stream as transformers does: the same tokens."""
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=12)
    assert same_as_transformers(model, ref, ids, mask, seed=5, do_sample=True, max_new_tokens=16, **kw), kw


def test_sampling_filters_change_the_draws(pair):
    """Each of min_p, typical_p, epsilon_cutoff and eta_cutoff (at the values the test above checks against
    transformers) changes what the same seed draws, so that test compares them at work; bad values are refused."""
    model, _ = pair
    ids, mask = random_batch(96, LENGTHS, seed=12)
    plain = model.generate(ids, mask, do_sample=True, max_new_tokens=16, seed=5)
    for kw in [dict(min_p=0.1), dict(typical_p=0.7), dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.1)]:
        assert not torch.equal(model.generate(ids, mask, do_sample=True, max_new_tokens=16, seed=5, **kw), plain), kw
    for kw in [dict(min_p=1.5), dict(typical_p=0.0), dict(epsilon_cutoff=1.0), dict(eta_cutoff=-0.1)]:
        with pytest.raises(ValueError, match=next(iter(kw))):
            model.generate(ids, mask, do_sample=True, max_new_tokens=4, **kw)


def test_sampling_is_repeatable_per_seed(pair):
    model, _ = pair
    ids, mask = random_batch(96, LENGTHS, seed=13)
    a = model.generate(ids, mask, do_sample=True, max_new_tokens=16, seed=1)
    b = model.generate(ids, mask, do_sample=True, max_new_tokens=16, seed=1)
    c = model.generate(ids, mask, do_sample=True, max_new_tokens=16, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(ids, mask, do_sample=True, max_new_tokens=16, generator=g), a)


def test_top_k_1_is_greedy(pair):
    model, _ = pair
    ids, mask = random_batch(96, LENGTHS, seed=14)
    greedy = model.generate(ids, mask, max_new_tokens=20)
    for seed in range(3):
        assert torch.equal(model.generate(ids, mask, do_sample=True, top_k=1, max_new_tokens=20, seed=seed), greedy)


def test_sampled_tokens_come_from_the_allowed_set(pair):
    """Re-score every prefix with the uncached model: each sampled token is among the top_k most likely, and the
    tokens more likely than it hold less than top_p of the (top-k, temperature) distribution."""
    model, _ = pair
    ids, mask = random_batch(96, LENGTHS * 3, seed=15)
    top_k, top_p, temperature = 6, 0.7, 1.3
    rows = model.generate(ids, mask, do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                          max_new_tokens=12, seed=3)
    with torch.no_grad():
        logits = model(ids, mask, decoder_input_ids=rows[:, :-1]).float() / temperature
    checked = 0
    for b in range(rows.shape[0]):
        for t in range(rows.shape[1] - 1):
            if t > 0 and rows[b, t].item() in (0, 1):  # ended
                break
            token = rows[b, t + 1].item()
            kth = logits[b, t].topk(top_k).values[-1]
            probs = torch.where(logits[b, t] >= kth, logits[b, t], float("-inf")).softmax(-1)
            assert logits[b, t, token] >= kth
            assert probs[probs > probs[token]].sum() < top_p
            checked += 1
    assert checked > 100


def test_sampling_frequencies_match_probabilities(pair):
    """On a fixed prefix, each token's empirical rate is within 4.5 standard errors of its probability."""
    model, _ = pair
    ids, mask = random_batch(96, [9], seed=16)
    n, temperature = 6000, 2.0
    with torch.no_grad():
        probs = (model(ids, mask, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))[0, -1].float()
                 / temperature).softmax(-1)
    rows = model.generate(ids.expand(n, -1), mask.expand(n, -1), do_sample=True, top_k=0, temperature=temperature,
                          max_new_tokens=1, seed=4)
    rate = torch.bincount(rows[:, 1], minlength=probs.numel()).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert (probs > 0.005).sum() >= 20 and probs.max() > 0.05  # spread out, so the test means something
    assert ((rate - probs).abs() <= 4.5 * stderr + 1e-3).all()


def test_defaults_come_from_the_checkpoint(tmp_path):
    """generation_config.json supplies defaults (transformers reads the same file); explicit arguments win."""
    make_checkpoint(tmp_path, "relu-tied", seed=3)
    settings = dict(num_beams=3, max_length=12, no_repeat_ngram_size=2, length_penalty=0.5, num_return_sequences=2)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, **settings}))
    model, ref = load_model(tmp_path, dtype=torch.float64), reference(tmp_path)
    ids, mask = random_batch(96, LENGTHS, seed=17)
    assert same_as_transformers(model, ref, ids, mask)
    rows = model.generate(ids, mask)
    assert rows.shape[0] == 2 * len(LENGTHS) and rows.shape[1] <= 12  # num_return_sequences, max_length
    assert same_as_transformers(model, ref, ids, mask, num_beams=1, num_return_sequences=1, max_new_tokens=15)
    assert model.generate(ids, mask, num_beams=1, num_return_sequences=1).shape[0] == len(LENGTHS)


def test_score_equals_transformers_loss(pair):
    model, ref = pair
    ids, mask = random_batch(96, [7, 3, 12, 5], seed=18)
    labels = random_labels(96, [9, 4, 9, 7], seed=18)
    with torch.no_grad():
        loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    sums, counts = model.score(ids, mask, labels)
    assert counts.tolist() == [9, 4, 9, 7]
    torch.testing.assert_close(-sums.sum() / counts.sum(), loss, rtol=1e-10, atol=0)
    # padding given as a mask instead of -100 scores the same
    padded = labels.masked_fill(labels == -100, 0)
    sums2, counts2 = model.score(ids, mask, padded, labels_mask=labels != -100)
    assert torch.equal(sums, sums2) and torch.equal(counts, counts2)


def test_returned_scores(pair):
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=19)
    kw = dict(max_new_tokens=20, num_beams=3, num_return_sequences=2, length_penalty=1.5)
    rows, scores = model.generate(ids, mask, return_scores=True, **kw)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    assert torch.equal(rows, out.sequences)
    torch.testing.assert_close(scores, out.sequences_scores, rtol=0, atol=0)
    # greedy: the sum of the model's log-probabilities of the generated tokens, </s> included
    rows, scores = model.generate(ids, mask, max_new_tokens=20, return_scores=True)
    generated = rows[:, 1:]
    after_end = (generated == 1).long().cumsum(1) - (generated == 1).long() > 0
    sums, _ = model.score(ids, mask, generated.masked_fill(after_end, -100))
    torch.testing.assert_close(scores.double(), sums, rtol=1e-5, atol=1e-5)


def test_stream_yields_the_generated_tokens(pair):
    model, _ = pair
    ids, mask = random_batch(96, LENGTHS, seed=20)
    for kw in [dict(max_new_tokens=20), dict(max_new_tokens=20, do_sample=True, top_p=0.9)]:
        rows = model.generate(ids, mask, seed=9, **kw)
        steps = list(model.stream(ids, mask, seed=9, **kw))
        assert torch.equal(torch.stack(steps, 1), rows[:, 1:])
    with pytest.raises(ValueError, match="streaming"):
        next(model.stream(ids, mask, num_beams=2))


def test_cli_stream_json_and_sampling(tmp_path):
    import shutil
    from pathlib import Path

    make_checkpoint(tmp_path, "gated-gelu-untied", seed=7, vocab_size=32128)
    tok = Path(__file__).parent / "fixtures" / "flan-t5-small"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        shutil.copy(tok / f, tmp_path / f)

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "nanoflant5", "generate", "--model", str(tmp_path), "--prompt",
                            "How do I make pesto sauce?", "--prompt", "Say hi.", *args], capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = run("--max-new-tokens", "24")
    assert run("--max-new-tokens", "24", "--stream") == plain
    sampled = ["--do-sample", "--top-p", "0.9", "--temperature", "0.8", "--max-new-tokens", "24", "--seed", "3"]
    assert run(*sampled) == run(*sampled) != run(*sampled[:-1], "4")
    rows = [json.loads(line) for line in run("--max-new-tokens", "24", "--json").splitlines()]
    assert [r["prompt"] for r in rows] == [0, 1] and [r["text"] + "\n" for r in rows] == plain.splitlines(True)
    assert all(r["score"] < 0 for r in rows)


def test_checking_for_the_end_less_often_changes_nothing(pair, monkeypatch):
    """On accelerators the decode loop checks "all finished?" only every few steps (no stall per step); forcing that
    on CPU gives the same rows as transformers."""
    import nanoflant5.generate as gen

    monkeypatch.setitem(gen.CHECK_EVERY, "cpu", 3)
    model, ref = pair
    ids, mask = random_batch(96, LENGTHS, seed=21)
    for kw in [dict(max_new_tokens=24), dict(max_new_tokens=24, min_new_tokens=5),
               dict(max_new_tokens=20, num_beams=3, num_return_sequences=2),
               dict(max_new_tokens=20, num_beams=2, early_stopping=True, length_penalty=2.0),
               dict(max_new_tokens=20, num_beams=4, early_stopping="never"),
               dict(max_new_tokens=20, do_sample=True, top_k=5)]:
        assert same_as_transformers(model, ref, ids, mask, seed=3, **kw), kw
