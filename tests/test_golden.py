"""Golden tests on a real checkpoint, run only when one is on disk:

    NANOFLANT5_CHECKPOINT=/path/to/flan-t5-small python -m pytest tests/test_golden.py

(a folder with config.json, weights and tokenizer files, e.g. a snapshot of google/flan-t5-small). They compare
nanoflant5's text with transformers' for real prompts in float32, greedy and beam search, batched.
"""

import os

import pytest
import torch

CHECKPOINT = os.environ.get("NANOFLANT5_CHECKPOINT")
pytestmark = pytest.mark.skipif(not CHECKPOINT, reason="set NANOFLANT5_CHECKPOINT to a real FLAN-T5 folder")

PROMPTS = [
    "How do I make pesto sauce?",
    "Translate English to German: How old are you?",
    "Answer the following question. What is the capital of France?",
    "Q: Roger has 5 tennis balls. He buys 2 more cans of tennis balls. Each can has 3 tennis balls. How many tennis "
    "balls does he have now? A: Let's think step by step.",
    "summarize: The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side.",
]


@pytest.mark.parametrize("kw", [dict(max_new_tokens=48), dict(max_new_tokens=48, num_beams=4),
                                dict(max_new_tokens=48, num_beams=4, num_return_sequences=2, length_penalty=2.0,
                                     early_stopping=True)])
def test_real_checkpoint_matches_transformers(kw):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from nanoflant5 import T5, Tokenizer

    ours, tok = T5.from_pretrained(CHECKPOINT), Tokenizer.from_pretrained(CHECKPOINT)
    ref, ref_tok = T5ForConditionalGeneration.from_pretrained(CHECKPOINT).eval(), AutoTokenizer.from_pretrained(
        CHECKPOINT)
    ids, mask = tok.encode(PROMPTS)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    got = ours.generate(ids, mask, **kw)
    assert tok.batch_decode(got) == ref_tok.batch_decode(want, skip_special_tokens=True)
    assert torch.equal(got, want)
