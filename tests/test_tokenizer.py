"""Token ids and decoded text against transformers' AutoTokenizer on the real FLAN-T5 tokenizer files."""

import csv
import shutil
from pathlib import Path

import pytest

from nanoflant5 import Tokenizer

FOLDER = Path(__file__).parent / "fixtures" / "flan-t5-small"
TEXTS = [
    "How do I make pesto sauce?", "", " ", "Übersetze: Grüße aus Köln — 東京 😀", "a  b   c", "trailing space ",
    "  leading", "<extra_id_0> walks in <extra_id_1> park", "x__y ___ z", "tab\there\nnewline", "ﬁ ligature ①",
    "Q: What is 12*7? A: Let's think step by step.", "summarize: " + "long text " * 200,
]


def mmlu_questions():
    shared = Path(__file__).parents[2] / "shared" / "data" / "mmlu" / "dev"
    rows = []
    for f in sorted(shared.glob("*.csv"))[:10]:
        with open(f, encoding="utf-8") as fh:
            rows += [r[0] for r in csv.reader(fh)]
    return rows


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    return Tokenizer.from_pretrained(FOLDER), AutoTokenizer.from_pretrained(FOLDER)


def test_ids_and_masks_match(pair):
    ours, ref = pair
    texts = TEXTS + mmlu_questions()
    ids, mask = ours.encode(texts)
    want = ref(texts, padding=True, return_tensors="pt")
    assert ids.tolist() == want.input_ids.tolist()
    assert mask.tolist() == want.attention_mask.tolist()


def test_decode_matches(pair):
    ours, ref = pair
    ids, _ = ours.encode(TEXTS)
    for row in ids:
        assert ours.decode(row) == ref.decode(row, skip_special_tokens=True)
        assert ours.decode(row, skip_special_tokens=False) == ref.decode(row, skip_special_tokens=False)


def test_truncation_keeps_end_of_sequence(pair):
    ours, _ = pair
    ids, mask = ours.encode(["one two three four five six seven", "hi"], max_length=4)
    assert ids.shape == (2, 4) and ids[0, -1].item() == 1
    assert mask.tolist()[1] == [1, 1, 0, 0]


def test_spiece_only_folder(tmp_path, pair):
    """A folder with only spiece.model: the same ids as AutoTokenizer on that folder."""
    from transformers import AutoTokenizer

    for f in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FOLDER / f, tmp_path / f)
    ours, ref = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = [t for t in TEXTS if "<extra_id" not in t] + mmlu_questions()
    for text in texts:
        assert ours.encode_ids(text) == ref(text).input_ids, text
        ids = ours.encode_ids(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


def test_spiece_only_folder_sentinels(tmp_path, pair):
    """<extra_id_N> tokens get T5's ids (<extra_id_0> = 32099, counting down) from spiece.model alone."""
    shutil.copy(FOLDER / "spiece.model", tmp_path / "spiece.model")
    ours, full = Tokenizer.from_pretrained(tmp_path), pair[0]
    text = "<extra_id_0> walks in <extra_id_1> park <extra_id_99>"
    assert ours.encode_ids(text) == full.encode_ids(text)
    assert ours.encode_ids("<extra_id_0>")[0] == 32099
