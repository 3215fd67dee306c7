"""Training: loss parity, data errors, resume after kill -9, signals, torchrun equivalence, export, a toy task."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint, random_batch, random_labels, reference
from nanoflant5 import T5, Tokenizer
from nanoflant5.train import DataError, loss_sum, read_examples

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import reverse_words  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = FIXTURES / "flan-t5-small"
TINY = Path(__file__).parents[1] / "examples" / "tiny-t5"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reverse_data(path, n, seed=0):
    """The toy task of examples/reverse_words.py: reverse lists of 2-3 words drawn from 8."""
    return reverse_words.write(path, reverse_words.examples(n, seed=seed))


def run_train(*args, env=None, check=True, **popen):
    cmd = [sys.executable, "-m", "nanoflant5", "train", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr
    return r


def weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


COMMON = ["--model", TINY, "--from-scratch", "--tokenizer", TOKENIZER, "--lr", "3e-3", "--seed", "3"]


def test_loss_matches_transformers(checkpoint):
    folder, ref = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder, dtype=torch.float64)
    ids, mask = random_batch(96, [7, 3, 12, 5], seed=2)
    labels = random_labels(96, [4, 6, 2, 6], seed=2)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = loss_sum(model, ids, mask, labels, torch.autocast("cpu", enabled=False)) / (labels != -100).sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("content, message", [
    (b'{"input": "a", "target": "b"}\n{"input": "a", "target": \n', r":2: malformed JSON"),
    (b'{"input": "a", "target": "b"}\n{"input": "a"}\n', r":2: missing field 'target'"),
    (b'{"input": "a", "target": "  "}\n', r":1: empty target"),
    (b'', r": no examples \(empty file\)"),
    (b'{"input": "a", "target": "b"}\n{"input": "\xff\xfe", "target": "b"}\n', r":2: not UTF-8"),
    (b'[1, 2]\n', r":1: expected a JSON object"),
])
def test_data_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        read_examples(path)


def test_data_formats(tmp_path):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
        {"instruction": "Name a colour.", "context": "", "response": "Red."}])
    assert read_examples(dolly) == [("Summarise.\n\nA long text.", "Short."), ("Name a colour.", "Red.")]
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    assert read_examples(renamed, "question", "answer") == [("2+2?", "4")]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("input\ttarget\nWhat is 1+1?\t2\trationale\n", encoding="utf-8")
    assert read_examples(tsv) == [("What is 1+1?", "2")]
    shared = Path(__file__).parents[2] / "shared" / "data" / "dolly" / "dolly_151_alpaca_prompt_format.jsonl"
    if shared.exists():
        assert len(read_examples(shared)) == 151  # prompt/answer fields


def test_cli_reports_bad_data_before_training(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n{"input": "a", "targ": "b"}\n')
    r = run_train(*COMMON, "--data", data, "--output", tmp_path / "run", "--max-steps", "2", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {data}:2: missing field 'target'") and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite(tmp_path):
    data = reverse_data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    r = run_train(*COMMON, "--data", data, "--output", out, "--max-steps", "1", check=False)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert (out / "precious.txt").read_text() == "mine"
    run_train(*COMMON, "--data", data, "--output", out, "--max-steps", "1", "--overwrite")
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()


def test_kill_9_and_resume_equals_uninterrupted(tmp_path):
    data = reverse_data(tmp_path / "d.jsonl", 200)
    args = [*COMMON, "--data", data, "--max-steps", "16", "--save-every", "2", "--batch-size", "16",
            "--dropout", "0.1", "--schedule", "cosine", "--warmup-steps", "3"]
    run_train(*args, "--output", tmp_path / "straight")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanoflant5", "train", *map(str, args), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000004.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    # a checkpoint write cut short leaves only a temporary file, which resuming ignores
    (out / "checkpoints" / ".step-0000099.pt.tmp").write_bytes(b"half a checkpoint")
    run_train(*args, "--output", out, "--resume")
    assert_same_weights(out, tmp_path / "straight", atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 16


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(tmp_path, signum):
    data = reverse_data(tmp_path / "d.jsonl", 200)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nanoflant5", "train", *map(str, COMMON), "--data", str(data),
                             "--output", str(out), "--max-steps", "100000", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    saved = sorted((out / "checkpoints").glob("step-*.pt"))
    assert saved and torch.load(saved[-1], weights_only=False)["step"] >= 2


def torchrun(*args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "nanoflant5", "train",
                        *map(str, args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_grad_accum_and_two_processes_equal_one_big_batch(tmp_path):
    """Global batch 8: 1 process x 8, 1 process x 4 x 2 accumulation, 2 processes (gloo) x 4 with DDP and with
    FSDP2 — the same weights."""
    data = reverse_data(tmp_path / "d.jsonl", 100)
    args = [*COMMON, "--data", data, "--max-steps", "4", "--dropout", "0", "--save-every", "2"]
    run_train(*args, "--output", tmp_path / "one", "--batch-size", "8")
    run_train(*args, "--output", tmp_path / "accum", "--batch-size", "4", "--grad-accum", "2")
    torchrun(*args, "--output", tmp_path / "two", "--batch-size", "4")
    torchrun(*args, "--output", tmp_path / "fsdp", "--batch-size", "4", "--fsdp")
    assert_same_weights(tmp_path / "fsdp", tmp_path / "two", atol=1e-4)
    assert len(list((tmp_path / "fsdp" / "checkpoints").glob("step-*.pt"))) == 2
    # float tolerance: summation order differs, and Adam's normalisation can magnify it on near-zero gradients
    # (measured: 1 element of 10.6M differs by 4e-5; a wrong batch split or loss scaling differs by ~lr = 3e-3)
    assert_same_weights(tmp_path / "accum", tmp_path / "one", atol=1e-4)
    assert_same_weights(tmp_path / "two", tmp_path / "one", atol=1e-4)


def test_export_loads_in_transformers(tmp_path, checkpoint):
    """Fine-tune a checkpoint; the exported folder loads in transformers with the same logits, and generates."""
    folder = tmp_path / "base"
    make_checkpoint(folder, "gated-gelu-untied", seed=7, vocab_size=32128)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        shutil.copy(TOKENIZER / f, folder / f)
    data = reverse_data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "run"
    run_train("--model", folder, "--data", data, "--output", out, "--max-steps", "3", "--batch-size", "4")
    ours, ref = T5.from_pretrained(out, dtype=torch.float64), reference(out)
    assert not torch.equal(ours.lm_head.weight, T5.from_pretrained(folder, dtype=torch.float64).lm_head.weight)
    tok = Tokenizer.from_pretrained(out)
    ids, mask = tok.encode(["reverse: red cat", "reverse: sun moon tree"])
    dec = torch.randint(0, 32128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, dec), ref(input_ids=ids, attention_mask=mask,
                                                               decoder_input_ids=dec).logits, rtol=0, atol=1e-10)
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=8),
                           ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def test_tiny_model_learns_the_toy_task(tmp_path):
    """examples/tiny-t5 from scratch, the real tokenizer, 500 steps: reverses unseen 2-3 word lists."""
    train, held_out = reverse_data(tmp_path / "train.jsonl", 2000, seed=0), reverse_data(tmp_path / "eval.jsonl", 100,
                                                                                         seed=1)
    out = tmp_path / "run"
    run_train(*COMMON[:-4], "--lr", "1e-3", "--seed", "0", "--data", train, "--eval-data", held_out, "--output", out,
              "--max-steps", "500", "--batch-size", "32", "--warmup-steps", "50", "--schedule", "cosine",
              "--eval-every", "250", env={"OMP_NUM_THREADS": "2"})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval_loss"] < 0.1 < metrics[0]["loss"]
    model, tok = T5.from_pretrained(out), Tokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    ids, mask = tok.encode([r["input"] for r in rows])
    answers = tok.batch_decode(model.generate(ids, mask, max_new_tokens=12))
    exact = sum(a == r["target"] for a, r in zip(answers, rows)) / len(rows)
    assert exact >= 0.9, exact


def test_other_options_run(tmp_path):
    """bfloat16 autocast, activation checkpointing, Adafactor, linear schedule, epochs, eval data, TSV."""
    tsv = tmp_path / "d.tsv"
    tsv.write_text("".join(f"{r['input']}\t{r['target']}\n" for r in reverse_words.examples(24)), encoding="utf-8")
    out = tmp_path / "run"
    run_train(*COMMON, "--data", tsv, "--eval-data", reverse_data(tmp_path / "e.jsonl", 8), "--output", out,
              "--epochs", "1", "--batch-size", "8", "--dtype", "bfloat16", "--grad-checkpointing",
              "--optimizer", "adafactor", "--schedule", "linear", "--warmup-steps", "1", "--weight-decay", "0.01")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # 24 examples / 8 per step
    assert all(math.isfinite(m["loss"]) for m in metrics) and math.isfinite(metrics[-1]["eval_loss"])
    assert metrics[-1]["lr"] < metrics[1]["lr"]  # linear decay
    assert T5.from_pretrained(out).config.d_model == 128
