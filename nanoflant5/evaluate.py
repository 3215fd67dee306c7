"""nanoflant5 eval: lm-evaluation-harness tasks on the nanoflant5 model (harness.py), reading the tasks' datasets
from the hub, or with data=DIR from local files:

    DIR/mmlu/{dev,val,test}/<subject>_{dev,val,test}.csv   Hendrycks' MMLU CSVs: no header, question, A, B, C, D and
                                                           the answer's letter (or a header question,choice0..choice3,
                                                           answer with the answer's index 0-3)
    DIR/gsm8k/*train*.jsonl, *test*.jsonl                  GSM8K: {"question" (or "prompt"), "answer"} a line

(Without the mmlu/ or gsm8k/ level, DIR itself is read: Hendrycks' data/ folder, GSM8K's grade_school_math/data.)

Only where the rows come from changes (LocalTask): prompts, few-shot rules, filters and scoring are lm-eval's own
task configs, so the results are what `lm_eval --model nanoflant5 --tasks ...` reports for the same rows. GSM8K's
few-shot examples come from its train split; without a local train file they come from the test split, the question
being asked left out (lm-eval's rule when the two splits are one).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

try:
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
except ImportError as e:
    raise ImportError(f"nanoflant5 eval needs lm-evaluation-harness: pip install 'nanoflant5[eval]' ({e})") from e

from . import harness  # noqa: F401  (registers the model "nanoflant5")

MMLU_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}  # folder -> the hub dataset's (cais/mmlu) split


class EvalError(ValueError):
    """A task or data folder nanoflant5 eval cannot use (one line on the command line)."""


class LocalTask(ConfigurableTask):
    """An lm-eval task whose dataset is read from the folder in its metadata's "local_data" instead of the hub."""

    def __init__(self, config: dict):
        config = {k: v for k, v in config.items() if k != "class"}  # (how TaskManager builds it: see local_tasks)
        self.folder = Path(config["metadata"]["local_data"])
        if config.get("dataset_path") == "openai/gsm8k" and "train" not in gsm8k_files(self.data("gsm8k")):
            config["fewshot_split"] = config["test_split"]  # lm-eval then leaves the question asked out
            config["training_split"] = None
        super().__init__(config=config)

    def data(self, name: str) -> Path:
        """DIR/name, or DIR itself when it has no such folder."""
        return self.folder / name if (self.folder / name).is_dir() else self.folder

    def download(self, dataset_kwargs=None, **kwargs):
        path, name = self.config.dataset_path, self.config.dataset_name
        if path == "cais/mmlu":
            self.dataset = datasets.DatasetDict(read_mmlu(self.data("mmlu"), name))
        elif path == "openai/gsm8k":
            self.dataset = datasets.DatasetDict(read_gsm8k(self.data("gsm8k")))
        else:
            raise EvalError(f"--data reads MMLU (cais/mmlu) and GSM8K (openai/gsm8k) tasks; {self.config.task} reads "
                            f"{path}")


def read_mmlu(folder: Path, subject: str) -> dict:
    """A subject's splits as cais/mmlu has them: question, subject, choices (4), answer (0-3)."""
    splits = {}
    for split, hub_split in MMLU_SPLITS.items():
        path = folder / split / f"{subject}_{split}.csv"
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
            rows = [r[:5] + ["ABCD"[int(r[5])]] for r in rows[1:]]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 6 or r[5] not in ("A", "B", "C", "D")]
        if bad:
            raise EvalError(f"{path}: row {bad[0]} is not question,A,B,C,D,answer letter (or the header's format)")
        splits[hub_split] = datasets.Dataset.from_list(
            [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in rows])
    if "test" not in splits:
        raise EvalError(f"no MMLU test file for {subject}: {folder / 'test' / f'{subject}_test.csv'}")
    return splits


def gsm8k_files(folder: Path) -> dict:
    return {split: path for path in sorted(folder.glob("*.jsonl")) for split in ("train", "test") if split in path.name}


def read_gsm8k(folder: Path) -> dict:
    """GSM8K's splits as openai/gsm8k has them: question, answer (the reasoning, then "#### number")."""
    files = gsm8k_files(folder)
    if "test" not in files:
        raise EvalError(f"no GSM8K test file (*test*.jsonl) in {folder}")
    splits = {}
    for split, path in files.items():
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    question = row.get("question", row.get("prompt"))
                    if not isinstance(question, str) or not isinstance(row.get("answer"), str):
                        raise EvalError(f"{path}:{n}: a GSM8K row needs \"question\" (or \"prompt\") and \"answer\"")
                    rows.append({"question": question, "answer": row["answer"]})
        splits[split] = datasets.Dataset.from_list(rows)
    return splits


def local_tasks(names: list[str], data) -> tuple[list, TaskManager]:
    """lm-eval's tasks (or groups) by name; with data, built as LocalTasks reading that folder."""
    manager = TaskManager(metadata={"local_data": str(Path(data).resolve())} if data else None)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise EvalError(f"unknown lm-eval task {unknown[0]!r} (lm-eval's names: mmlu, mmlu_abstract_algebra, gsm8k, "
                        f"...; `lm_eval ls tasks` lists them)")
    if not data:
        return list(names), manager
    if not Path(data).is_dir():
        raise EvalError(f"--data {data}: no such folder")
    # The factory passes these overrides down to every task of a group; "class" makes each a LocalTask.
    return [manager._factory.build(manager.task_index[n], overrides={"class": LocalTask}, registry=manager.task_index)
            for n in names], manager


def evaluate(model: str, tasks: list[str], *, data=None, num_fewshot: int | None = None, limit: int | None = None,
             batch_size: int = 16, dtype: str = "float32", device: str = "cpu", max_length: int | None = None,
             quantize: str | None = None, adapter=None) -> dict:
    """lm_eval.simple_evaluate's results for the nanoflant5 model on these tasks (see the module's docstring)."""
    built, manager = local_tasks(tasks, data)
    args = dict(pretrained=str(model), dtype=dtype)
    if max_length:
        args["max_length"] = max_length
    if quantize:
        args["quantize"] = quantize
    if adapter:
        args["peft"] = str(adapter)  # (lm-eval's hf model's name for it)
    return simple_evaluate(model="nanoflant5", model_args=args, tasks=built, task_manager=manager,
                           num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device)


def report(results: dict) -> str:
    """lm-eval's tables: the tasks, then the groups."""
    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def to_json(results: dict) -> str:
    """The results as lm-eval's command line writes them."""
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def quiet_lm_eval():
    """lm-eval logs each task and request at INFO: the command shows its progress bars and the table instead."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
