"""The lm-evaluation-harness model (nanoflant5/harness.py) against lm-eval's own `hf` model with backend=seq2seq on
the same random-weight checkpoint (FLAN-T5's real tokenizer), both in float64: every loglikelihood, rolling
loglikelihood and generate_until answer equal, request for request (contexts longer than max_length included)."""

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from helpers import checkpoint_with_tokenizer, lm_eval_hf, mmlu_context, mmlu_rows  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

MAX_LENGTH = 48  # short, so that few-shot contexts are truncated from the left
MMLU = Path(__file__).parent / "fixtures" / "mmlu" / "dev" / "abstract_algebra_dev.csv"
GSM8K = Path(__file__).parent / "fixtures" / "gsm8k" / "gsm8k_test.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import nanoflant5.harness  # noqa: F401  (registers "nanoflant5")
    from lm_eval.api.registry import get_model

    folder = checkpoint_with_tokenizer(tmp_path_factory.mktemp("harness-model"), seed=11)
    args = dict(dtype="float64", batch_size=3, max_length=MAX_LENGTH, device="cpu")
    ours = get_model("nanoflant5")(pretrained=str(folder), **args)
    theirs, tied = lm_eval_hf(folder, **args)  # the reference, with the checkpoint's output layer given back
    assert tied  # (the tie lm_eval_hf undoes)
    assert not torch.equal(theirs.model.lm_head.weight, theirs.model.shared.weight)
    return ours, theirs


def mmlu_requests():
    """MMLU-style prompts (lm-eval's mmlu format: question, lettered choices, "Answer:") with the four letters as
    continuations, zero- and few-shot, and an empty context."""
    rows = mmlu_rows(MMLU)
    contexts = [mmlu_context("abstract_algebra", [], r) for r in rows[:3]]
    contexts.append(mmlu_context("abstract_algebra", rows[:2], rows[2]))  # 2-shot: truncated
    requests = [(c, f" {letter}") for c in contexts for letter in "ABCD"]
    requests += [("", "Abstract algebra studies groups."), ("Question: 2 + 2 =", " 4 and not 5")]
    return [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]


def test_loglikelihood_equals_lm_eval_hf_seq2seq(models):
    ours, theirs = models
    requests = mmlu_requests()
    want = theirs.loglikelihood(requests, disable_tqdm=True)
    got = ours.loglikelihood(requests, disable_tqdm=True)
    assert len(got) == len(want) == len(requests)
    for (a, greedy_a), (b, greedy_b), r in zip(got, want, requests):
        assert a == pytest.approx(b, abs=1e-6), r.args
        assert greedy_a == greedy_b, r.args
    assert len({round(a, 3) for a, _ in got}) > len(got) // 2  # the answers differ from one another
    assert len(ours.tok_encode(requests[12].args[0])) > MAX_LENGTH  # the few-shot context was truncated


def test_loglikelihood_rolling_equals_lm_eval_hf_seq2seq(models):
    ours, theirs = models
    texts = ["Groups, rings and fields. " * 20, "A short text.", "Z_3[x]/(x^2 + c) is a field for some c."]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    want = theirs.loglikelihood_rolling(requests, disable_tqdm=True)
    got = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-6)
    assert len(ours.tok_encode(texts[0])) > 2 * MAX_LENGTH  # several windows


def test_generate_until_equals_lm_eval_hf_seq2seq(models):
    """Greedy generation with stop strings and max_gen_toks, in batches of mixed lengths; the second group stops at
    a string taken from the first group's own outputs, so that cutting at a stop string is exercised."""
    ours, theirs = models
    contexts = [r.args[0] for r in mmlu_requests()[::4]] + ["Question: what is a group?\nAnswer:"]
    first = [Instance("generate_until", {}, (c, {"until": ["\n\n", "Question:"], "max_gen_toks": 10}), i)
             for i, c in enumerate(contexts)]
    want = theirs.generate_until(first, disable_tqdm=True)
    assert ours.generate_until(first, disable_tqdm=True) == want
    stop = next(w[len(w) // 2:len(w) // 2 + 3] for w in want if len(w) > 8)
    second = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": 10, "do_sample": False}), i)
              for i, c in enumerate(contexts)]
    cut = theirs.generate_until(second, disable_tqdm=True)
    assert ours.generate_until(second, disable_tqdm=True) == cut
    assert any(len(b) < len(a) and a.startswith(b) for a, b in zip(want, cut))  # cut at the new stop string


def test_continuations_of_a_context_share_one_encoder_pass(models, monkeypatch):
    """MMLU's four letters of a question land in one batch (lm-eval's length-sorted order) and their context is
    encoded once: 3 questions x 4 letters in batches of 8 encode 3 contexts (4 if a question straddles two batches)."""
    ours, _ = models
    rows = []
    encode = ours.model.encode
    monkeypatch.setattr(ours.model, "encode", lambda ids, mask: rows.append(len(ids)) or encode(ids, mask))
    monkeypatch.setattr(ours, "batch_size", 8)
    requests = mmlu_requests()[:12]
    assert len({r.args[0] for r in requests}) == 3
    ours.loglikelihood(requests, disable_tqdm=True)
    assert sum(rows) <= 4 and len(rows) == 2


def test_generate_until_on_gsm8k_stops_where_lm_eval_hf_stops(models):
    """GSM8K's real questions in lm-eval's gsm8k prompt (one shot), with stop strings that decide where the answers
    end: those answers equal lm-eval's hf model's, which stops decoding as its stopping criteria say (a string
    seen in every row, past the input's width of tokens) and then cuts at each stop string in turn."""
    ours, theirs = models
    rows = [json.loads(line) for line in open(GSM8K)]
    shot = f"Question: {rows[0]['prompt']}\nAnswer: {rows[0]['answer']}\n\n"
    contexts = [shot + f"Question: {r['prompt']}\nAnswer:" for r in rows[1:5]]

    def requests(until):
        return [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 40}), i)
                for i, c in enumerate(contexts)]

    steps = []
    hook = ours.model.decoder.register_forward_hook(lambda *args: steps.append(1))
    try:
        plain = ours.generate_until(requests(["Question:"]), disable_tqdm=True)
        plain_steps, steps[:] = len(steps), []
        assert plain == theirs.generate_until(requests(["Question:"]), disable_tqdm=True)
        # strings from late in each answer (cut in turn, they may overlap), then one that every row shows soon
        until = [w[3 * len(w) // 4:3 * len(w) // 4 + 3] for w in plain]
        assert all(len(s) == 3 for s in until), plain
        for stops in (until, until + ["e"]):
            steps[:] = []
            got = ours.generate_until(requests(stops), disable_tqdm=True)
            assert got == theirs.generate_until(requests(stops), disable_tqdm=True)
            assert all(len(a) < len(b) for a, b in zip(got, plain))
    finally:
        hook.remove()
    # "e" ended decoding soon after the input's width (MAX_LENGTH: the contexts are truncated), in both batches
    assert len(steps) <= 2 * (MAX_LENGTH + 5) < plain_steps, (len(steps), plain_steps)
