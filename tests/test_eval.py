"""nanoflant5 eval (nanoflant5/evaluate.py): lm-eval's MMLU and GSM8K tasks reading local files (real rows from
tests/fixtures), with lm-eval's prompts and scoring; the command's JSON equal to simple_evaluate's."""

import csv
import json
import shutil
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from helpers import checkpoint_with_tokenizer, mmlu_context, mmlu_rows  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SUBJECT = "abstract_algebra"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("eval-model"), seed=11)


def requests_of(name: str, data, num_fewshot: int, limit: int):
    from nanoflant5.evaluate import local_tasks

    (task,), _ = local_tasks([name], data)
    task.set_config("num_fewshot", num_fewshot)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task, task.instances


def test_local_mmlu_is_lm_eval_mmlu_prompt_on_the_csv_rows(tmp_path):
    """The local task's requests are lm-eval's MMLU prompt (first-n dev rows as shots) on the CSV's questions, and
    Hendrycks' own data/ folder (no mmlu/ level; no header, answer letters) reads the same."""
    dev, test = (mmlu_rows(FIXTURES / "mmlu" / s / f"{SUBJECT}_{s}.csv") for s in ("dev", "test"))
    _, requests = requests_of(f"mmlu_{SUBJECT}", FIXTURES, 2, 4)
    contexts = sorted({r.args[0] for r in requests}, key=[r.args[0] for r in requests].index)
    assert contexts == [mmlu_context(SUBJECT, dev[:2], row) for row in test[:4]]
    assert [r.args[1] for r in requests] == [" A", " B", " C", " D"] * 4

    for split, rows in (("dev", dev), ("test", test)):  # Hendrycks' CSVs: no header, the answer's letter
        (tmp_path / split).mkdir(parents=True)
        with open(tmp_path / split / f"{SUBJECT}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([[r["question"]] + [r[f"choice{i}"] for i in range(4)]
                                     + ["ABCD"[int(r["answer"])]] for r in rows])
    _, again = requests_of(f"mmlu_{SUBJECT}", tmp_path, 2, 4)
    assert [r.args for r in again] == [r.args for r in requests]


def test_local_gsm8k_shots_come_from_the_test_rows_but_not_the_question_asked():
    rows = [json.loads(line) for line in open(FIXTURES / "gsm8k" / "gsm8k_test.jsonl")]
    task, requests = requests_of("gsm8k", FIXTURES, 3, 4)
    assert task.config.fewshot_split == "test"  # no local train file
    for request, row in zip(requests, rows):
        context = request.args[0]
        assert context.endswith(f"Question: {row['prompt']}\nAnswer:")
        shots = [r for r in rows if f"Question: {r['prompt']}\nAnswer: {r['answer']}\n\n" in context]
        assert len(shots) == 3 and row not in shots
        assert request.args[1]["until"] == ["Question:", "</s>", "<|im_end|>"]


def test_eval_command_json_equals_simple_evaluate(folder, tmp_path, capsys):
    """`nanoflant5 eval` prints lm-eval's table and writes the results simple_evaluate returns for the same tasks;
    MMLU's accuracy is the share of questions whose answer letter the model scores highest."""
    from nanoflant5.cli import main
    from nanoflant5.evaluate import local_tasks, to_json
    from lm_eval.api.instance import Instance

    from nanoflant5.harness import NanoFlanT5

    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(folder), "--tasks", f"mmlu_{SUBJECT},gsm8k", "--data", str(FIXTURES),
                 "--num-fewshot", "2", "--limit", "4", "--batch-size", "4", "--max-length", "64",
                 "--device", "cpu", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert SUBJECT in table and "gsm8k" in table and "exact_match" in table
    got = json.loads(out.read_text())

    tasks, manager = local_tasks([f"mmlu_{SUBJECT}", "gsm8k"], FIXTURES)
    want = json.loads(to_json(lm_eval.simple_evaluate(
        model="nanoflant5", model_args=dict(pretrained=str(folder), dtype="float32", max_length=64), tasks=tasks,
        task_manager=manager, num_fewshot=2, limit=4, batch_size=4, device="cpu")))
    for key in ("results", "n-shot", "n-samples", "configs", "versions", "higher_is_better"):
        assert got[key] == want[key], key
    assert got["n-samples"][f"mmlu_{SUBJECT}"]["effective"] == got["n-samples"]["gsm8k"]["effective"] == 4

    model = NanoFlanT5(pretrained=str(folder), dtype="float32", batch_size=4, max_length=64)
    dev, test = (mmlu_rows(FIXTURES / "mmlu" / s / f"{SUBJECT}_{s}.csv") for s in ("dev", "test"))
    right = 0
    for row in test[:4]:
        context = mmlu_context(SUBJECT, dev[:2], row)
        answers = model.loglikelihood([Instance("loglikelihood", {}, (context, f" {x}"), i)
                                       for i, x in enumerate("ABCD")], disable_tqdm=True)
        scores = [score for score, _ in answers]
        right += max(range(4), key=scores.__getitem__) == int(row["answer"])
    assert got["results"][f"mmlu_{SUBJECT}"]["acc,none"] == pytest.approx(right / 4)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
    (["--tasks", "mmlu_anatomy"], "no MMLU test file for anatomy"),
    (["--tasks", "gsm8k", "--data", "/nonexistent"], "--data /nonexistent: no such folder"),
    (["--tasks", "gsm8k", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
    (["--tasks", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "gsm8k", "--output", "/nonexistent/r.json"], "--output /nonexistent/r.json: no such folder"),
    (["--tasks", "gsm8k", "--quantize", "int8", "--dtype", "float64"], "--quantize int8 keeps the model's float parts"),
])
def test_eval_misuse_is_one_line(folder, capsys, args, message):
    from nanoflant5.cli import main

    argv = ["eval", "--model", str(folder), "--data", str(FIXTURES)] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_eval_with_a_lora_adapter_is_the_merged_model(folder, tmp_path):
    """peft=DIR (lm-eval's hf name; `nanoflant5 eval --adapter DIR`): the harness scores with the adapter merged,
    as the merged checkpoint scores, and not as the base model does."""
    import torch
    from lm_eval.api.instance import Instance

    from nanoflant5 import T5, lora
    from nanoflant5.harness import NanoFlanT5
    from nanoflant5.load import save_pretrained
    from nanoflant5.tokenizer import TOKENIZER_FILES

    model = T5.from_pretrained(folder)
    lora.add_adapters(model, ["q", "v", "wo"], r=4, alpha=8)
    with torch.no_grad():
        for m in lora.adapted(model).values():
            for b in m.lora_B.values():
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(b.numel()))
    lora.save_adapter(model, tmp_path / "adapter", ["q", "v", "wo"], 4, 8, 0.0, False)
    save_pretrained(lora.merge(model), tmp_path / "merged")
    for name in TOKENIZER_FILES:  # (the harness reads the tokenizer beside the weights)
        if (folder / name).exists():
            shutil.copy(folder / name, tmp_path / "merged" / name)
    dev = mmlu_rows(FIXTURES / "mmlu" / "dev" / f"{SUBJECT}_dev.csv")
    requests = [Instance("loglikelihood", {}, (mmlu_context(SUBJECT, dev[:1], row), f" {x}"), i)
                for i, (row, x) in enumerate(zip(dev[1:4], "ABC"))]
    args = dict(dtype="float32", batch_size=4, max_length=64)
    scores = {name: [s for s, _ in NanoFlanT5(pretrained=str(path), **args, **extra).loglikelihood(
                  requests, disable_tqdm=True)]
              for name, path, extra in [("adapter", folder, dict(peft=str(tmp_path / "adapter"))),
                                        ("merged", tmp_path / "merged", {}), ("base", folder, {})]}
    assert scores["adapter"] == pytest.approx(scores["merged"], abs=1e-4)
    assert scores["adapter"] != pytest.approx(scores["base"], abs=1e-2)


def test_eval_command_passes_the_adapter(folder, tmp_path, capsys):
    from nanoflant5.cli import main

    assert main(["eval", "--model", str(folder), "--adapter", str(tmp_path), "--tasks", f"mmlu_{SUBJECT}", "--data",
                 str(FIXTURES), "--limit", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: no adapter_config.json (not a peft adapter folder?)\n", err
