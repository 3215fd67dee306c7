"""`nanoflant5 compare` (compare.py): its counts and first differing positions on a case built to differ, and the
command end to end: float64 gives identical outputs to transformers; an int8 nanoflant5 against float32
transformers differs, and the report says where."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_with_tokenizer
from nanoflant5.compare import Comparison, first_difference, generated, read_prompts, report

DOLLY = Path(__file__).parent / "fixtures" / "dolly" / "dolly_6.jsonl"  # real Dolly prompts, as the seed compared
PROMPTS = [json.loads(line)["prompt"] for line in open(DOLLY)]


def test_counts_and_positions_on_a_case_built_to_differ():
    assert first_difference([5, 6, 7, 1], [5, 6, 7, 1]) is None
    assert first_difference([5, 6, 7, 1], [5, 9, 7, 1]) == 1
    assert first_difference([5, 6, 1], [5, 6, 7, 1]) == 2  # one ends earlier
    assert first_difference([], [4]) == 0
    assert generated(torch.tensor([0, 5, 6, 1, 0, 0]), eos=1, pad=0) == [5, 6, 1]
    assert generated(torch.tensor([0, 5, 6, 7]), eos=1, pad=0) == [5, 6, 7]  # ran to the limit
    results = [Comparison(0, "a", "x y", "x y", None), Comparison(1, "b", "x y", "x z", 1),
               Comparison(2, "c", "q", "q r", 3), Comparison(3, "d", "s", "s", None)]
    text = report(results, show=1)
    assert text.startswith("identical: 2/4 (50.0%)")
    assert "first differing token of the 2 that differ: median 3, mean 2.0" in text
    assert "#1 differs at token 1" in text and "'x z'" in text and "#2 differs" not in text
    assert "and 1 more" in text


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"input": "b", "x": 1}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"answer": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no prompt, input, text or question field"):
        read_prompts(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = checkpoint_with_tokenizer(tmp_path_factory.mktemp("compare-model"), seed=3)
    return folder, DOLLY


def run(*args):
    return subprocess.run([sys.executable, "-m", "nanoflant5", "compare", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_float64_outputs_are_identical(setup, tmp_path):
    folder, data = setup
    out = tmp_path / "out.jsonl"
    result = run("--model", str(folder), "--data", str(data), "--dtype", "float64", "--num-beams", "2",
                 "--max-new-tokens", "12", "--batch-size", "4", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"identical: {len(PROMPTS)}/{len(PROMPTS)} (100.0%)")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROMPTS))) and all(r["ours"] == r["theirs"] for r in rows)
    assert len({r["ours"] for r in rows}) > 2  # the prompts give different texts


def test_int8_against_transformers_differs_and_says_where(setup, tmp_path):
    folder, data = setup
    out = tmp_path / "out.jsonl"
    result = run("--model", str(folder), "--data", str(data), "--quantize", "int8", "--max-new-tokens", "12",
                 "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    differ = [r for r in rows if r["first_difference"] is not None]
    assert differ and f"identical: {len(rows) - len(differ)}/{len(rows)}" in result.stdout
    for r in differ:
        assert f"#{r['index']} differs at token {r['first_difference']}" in result.stdout
        assert r["ours"] != r["theirs"]


def test_errors_are_one_line(setup, tmp_path):
    folder, data = setup
    for args, message in [(["--data", str(tmp_path / "none.jsonl")], "error: --data "),
                          (["--data", str(data), "--num-beams", "0"], "error: --num-beams must be >= 1"),
                          (["--data", str(data), "--quantize", "int8", "--dtype", "float64"],
                           "error: --quantize int8 keeps the model's float parts in float32")]:
        result = run("--model", str(folder), *args)
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1
