"""Property tests (hypothesis): generate() over random argument combinations against transformers, and tokenizer
round trips."""

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import random_batch
from nanoflant5 import Tokenizer
from nanoflant5.load import load_model

TOKENIZER = Path(__file__).parent / "fixtures" / "flan-t5-small"


@functools.cache
def tokenizer():
    return Tokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def pair(checkpoint):
    folder, ref = checkpoint("relu-tied")
    return load_model(folder, dtype=torch.float64), ref


@st.composite
def generate_args(draw):
    num_beams = draw(st.integers(1, 4))
    kw = dict(max_new_tokens=draw(st.integers(1, 12)), num_beams=num_beams,
              min_new_tokens=draw(st.integers(0, 6)),
              repetition_penalty=draw(st.sampled_from([1.0, 0.7, 1.5])),
              no_repeat_ngram_size=draw(st.integers(0, 3)))
    if num_beams > 1:
        kw.update(length_penalty=draw(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])),
                  early_stopping=draw(st.sampled_from([False, True, "never"])),
                  num_return_sequences=draw(st.integers(1, num_beams)))
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=4))
    return kw, lengths, draw(st.integers(0, 1000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(generate_args())
def test_generate_equals_transformers_for_any_arguments(pair, case):
    kw, lengths, seed = case
    model, ref = pair
    ids, mask = random_batch(96, lengths, seed=seed)
    got = model.generate(ids, mask, **kw)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(got, want), kw
    n = kw.get("num_return_sequences", 1)
    assert got.shape[0] == len(lengths) * n and 1 <= got.shape[1] <= 1 + kw["max_new_tokens"]
    assert (got[:, 0] == 0).all()
    ends = (got[:, 1:] == 1).float().argmax(1)  # first </s> among the generated tokens, if any
    ended = (got[:, 1:] == 1).any(1)
    assert (ends[ended] >= kw["min_new_tokens"]).all()  # no </s> before min_new_tokens


@st.composite
def plain_text(draw):
    words = draw(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
                                  min_size=1, max_size=12), min_size=0, max_size=12))
    seps = draw(st.lists(st.sampled_from([" ", "  ", "\t", " \n "]), min_size=len(words), max_size=len(words)))
    return "".join(s + w for s, w in zip(seps, words))


@settings(max_examples=200, deadline=None)
@given(plain_text())
def test_tokenizer_round_trip(text):
    tok = tokenizer()
    ids = tok.encode_ids(text)
    assert ids[-1] == 1 and all(0 <= i < 32128 for i in ids)
    assert tok.decode(ids) == " ".join(text.split())  # whitespace runs collapse, as SentencePiece does


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_takes_any_text(text):
    tok = tokenizer()
    ids, mask = tok.encode([text, "x"])
    assert ids.shape == mask.shape and ids[0, mask[0].sum() - 1] == 1
    assert isinstance(tok.decode(ids[0]), str)
