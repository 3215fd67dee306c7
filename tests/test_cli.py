"""The command line against transformers' text, and its handling of misuse."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import checkpoint_with_tokenizer
from nanoflant5.cli import build_parser

PROMPTS = ["How do I make pesto sauce?", "Translate to German: The house is wonderful.", "",
           "Résumé of the año: 東京 and Köln",
           "summarize: " + " ".join(f"sentence {i} says something about pesto and basil." for i in range(90))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with the real 32128-token vocabulary and the real tokenizer files."""
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("cli-model"), seed=7)


def run(*args, **env):
    return subprocess.run([sys.executable, "-m", "nanoflant5", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def transformers_text(folder, prompts, **kw):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(folder)
    model = T5ForConditionalGeneration.from_pretrained(folder).eval()
    texts = []
    for p in prompts:  # one at a time, as a user would; the CLI batches them
        enc = tok([p], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, **kw)
        texts += tok.batch_decode(out, skip_special_tokens=True)
    return texts


@pytest.mark.parametrize("beam_args, kw", [
    ([], {}),
    (["--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5"],
     dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)),
    (["--compile"], {}),  # the decoding step through torch.compile (5 rows, 12 steps: no packing)
])
def test_generate_prints_what_transformers_generates(model_dir, beam_args, kw):
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "12", *beam_args]
    for p in PROMPTS:
        args += ["--prompt", p]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "torch.compile failed" not in result.stderr
    want = transformers_text(model_dir, PROMPTS, max_new_tokens=12, **kw)
    assert result.stdout.split("\n")[:-1] == want
    assert len(set(want)) > 2  # the prompts give different texts


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_quantized_generate_prints_what_the_python_api_does(model_dir, mode):
    """--quantize MODE: the CLI decodes with the model of T5.from_pretrained(..., quantize=MODE)."""
    from nanoflant5 import T5, Tokenizer

    result = run("generate", "--model", str(model_dir), "--max-new-tokens", "12", "--quantize", mode,
                 *[a for p in PROMPTS[:3] for a in ("--prompt", p)])
    assert result.returncode == 0, result.stderr
    model, tok = T5.from_pretrained(model_dir, quantize=mode), Tokenizer.from_pretrained(model_dir)
    want = [tok.decode(model.generate(*tok.encode([p]), max_new_tokens=12)[0]) for p in PROMPTS[:3]]
    assert result.stdout.split("\n")[:-1] == want


def test_input_file_keeps_order(model_dir, tmp_path):
    prompts = [f"question {i}: {'word ' * (i % 5)}?" for i in range(11)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    from_file = run("generate", "--model", str(model_dir), "--input-file", str(tmp_path / "prompts.txt"),
                    "--max-new-tokens", "8", "--batch-size", "4")
    from nanoflant5 import T5, Tokenizer

    model, tok = T5.from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    one_by_one = [tok.decode(model.generate(tok.encode(p)[0], max_new_tokens=8)[0]) + "\n" for p in prompts]
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == "".join(one_by_one)


def test_seed_command_spelling():
    """The seed project's command, with underscores and --model_size, parses to the same settings."""
    args = build_parser().parse_args(["generate", "--model_size", "large", "--prompt", "How do I make pesto sauce?",
                                      "--num_beams", "2", "--max_new_tokens", "100"])
    assert (args.model_size, args.num_beams, args.max_new_tokens) == ("large", 2, 100)
    assert args.prompt == ["How do I make pesto sauce?"]


def test_sampling_filters_reach_the_settings():
    from nanoflant5.cli import generation_settings
    from nanoflant5.config import GenerationConfig

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--do-sample", "--min-p", "0.1",
                                      "--typical_p", "0.9", "--epsilon-cutoff", "0.01", "--eta-cutoff", "0.02"])
    settings = generation_settings(args, GenerationConfig())
    assert (settings.min_p, settings.typical_p, settings.epsilon_cutoff, settings.eta_cutoff) == (0.1, 0.9, 0.01, 0.02)


def test_seed_command_offline_names_the_model(tmp_path):
    result = run("generate", "--model_size", "large", "--prompt", "How do I make pesto sauce?", "--num_beams", "2",
                 "--max_new_tokens", "100", HF_HUB_CACHE=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: google/flan-t5-large: not in the local hub cache")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, status, message", [
    (["--num-beams", "0"], 2, "error: --num-beams must be an integer >= 1"),
    (["--max-new-tokens", "-3"], 2, "error: --max-new-tokens must be an integer >= 1"),
    (["--num-beams", "2", "--num-return-sequences", "3"], 2, "error: --num-return-sequences (3) must be <="),
    (["--model", "/no/such/model"], 1, "error: /no/such/model: no such folder"),
    (["--input-file", "/no/such/file.txt"], 2, "error: --input-file /no/such/file.txt: No such file"),
    (["--do-sample", "--top-p", "1.5"], 2, "error: --top-p must be in (0, 1]"),
    (["--do-sample", "--top-p", "0"], 2, "error: --top-p must be in (0, 1]"),
    (["--do-sample", "--temperature", "0"], 2, "error: --temperature must be > 0 when sampling"),
    (["--do-sample", "--min-p", "1.5"], 2, "error: --min-p must be in [0, 1]"),
    (["--do-sample", "--eta-cutoff", "1"], 2, "error: --eta-cutoff must be in [0, 1)"),
    (["--stream", "--num-beams", "2"], 2, "error: --stream works with greedy decoding and sampling"),
    (["--num-beams", "x"], 2, "error: argument --num-beams/--num_beams: invalid int value: 'x'"),
    (["--quantize", "int8", "--dtype", "bfloat16"], 2,
     "error: --quantize int8 keeps the model's float parts in float32"),
    (["--quantize", "int4"], 2, "error: argument --quantize: invalid choice: 'int4'"),
])
def test_errors_are_one_line(model_dir, args, status, message):
    base = ["generate", "--prompt", "hi"] if "--model" in args else ["generate", "--model", str(model_dir),
                                                                      "--prompt", "hi"]
    result = run(*base, *args)
    assert result.returncode == status
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_broken_model_folders(model_dir, tmp_path):
    """Each broken folder gets one line naming the problem (exit 1), never a traceback."""
    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        edit(folder)
        return folder

    cases = {
        "no config.json": broken("noconfig", lambda f: (f / "config.json").unlink()),
        "model_type is 'bert'": broken("bert", lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"model_type": "t5"', '"model_type": "bert"'))),
        "unsupported feed_forward_proj": broken("ffn", lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"gated-gelu"', '"gated-swishy"'))),
        "truncated": broken("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:5000])),
        "no weights": broken("noweights", lambda f: (f / "model.safetensors").unlink()),
    }
    for message, folder in cases.items():
        result = run("generate", "--model", str(folder), "--prompt", "hi")
        assert result.returncode == 1, (message, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, (message, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_input_file_not_utf8_names_the_line(model_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    result = run("generate", "--model", str(model_dir), "--input-file", str(tmp_path / "bad.txt"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --input-file {tmp_path / 'bad.txt'}:3: not UTF-8")


def test_debug_shows_the_traceback():
    result = run("--debug", "generate", "--model", "/no/such/model", "--prompt", "hi")
    assert result.returncode == 1 and "Traceback" in result.stderr
