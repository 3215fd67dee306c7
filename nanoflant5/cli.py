"""Command line: a thin layer over the Python API.

    nanoflant5 generate --model google/flan-t5-base --prompt "Translate to German: Hello" --num-beams 4
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "w8a8")  # quantize.MODES (not imported here: the CLI loads torch only when it runs)
DEFAULT_MODEL = "google/flan-t5-base"
ADAPTER_HELP = "a LoRA adapter folder (peft's layout, e.g. from train --lora-r), merged into the model's weights"


class UsageError(Exception):
    """Misuse of the command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error (argparse would print the usage first)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanoflant5", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"local folder or hub id (default {DEFAULT_MODEL})")
    which.add_argument("--model-size", "--model_size", dest="model_size",
                       choices=("small", "base", "large", "xl", "xxl"), help="google/flan-t5-SIZE")
    g.add_argument("--adapter", help=ADAPTER_HELP)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--input-file", "--input_file", dest="input_file", help="a file with one prompt per line")
    # Generation settings: unset ones come from the checkpoint's generation_config.json, then transformers' defaults.
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   help="default: the checkpoint's generation config, else 128")
    g.add_argument("--min-new-tokens", "--min_new_tokens", dest="min_new_tokens", type=int)
    g.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int)
    g.add_argument("--num-return-sequences", "--num_return_sequences", dest="num_return_sequences", type=int)
    g.add_argument("--length-penalty", "--length_penalty", dest="length_penalty", type=float)
    g.add_argument("--early-stopping", "--early_stopping", dest="early_stopping", nargs="?", const=True,
                   type=early_stopping_value, metavar="{true,false,never}",
                   help="beam search: stop once num_beams hypotheses are finished ('never': canonical search)")
    g.add_argument("--do-sample", "--do_sample", dest="do_sample", action="store_true", default=None,
                   help="sample instead of choosing the most likely tokens")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, help="sampling: keep the k most likely (0: all)")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, help="sampling: nucleus mass in (0, 1]")
    g.add_argument("--min-p", "--min_p", dest="min_p", type=float,
                   help="sampling: drop tokens below this fraction of the likeliest's probability")
    g.add_argument("--typical-p", "--typical_p", dest="typical_p", type=float, help="sampling: typical mass")
    g.add_argument("--epsilon-cutoff", "--epsilon_cutoff", dest="epsilon_cutoff", type=float,
                   help="sampling: drop tokens less likely than this")
    g.add_argument("--eta-cutoff", "--eta_cutoff", dest="eta_cutoff", type=float, help="sampling: eta sampling")
    g.add_argument("--seed", type=int, help="sampling: seed for repeatable output")
    g.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", "--no_repeat_ngram_size", dest="no_repeat_ngram_size", type=int)
    out = g.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as it is generated (greedy or sampling)")
    out.add_argument("--json", action="store_true", help="one JSON object per output: prompt index, text, score")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="prompts decoded together")
    g.add_argument("--max-input-length", "--max_input_length", dest="max_input_length", type=int, default=None,
                   help="truncate prompts to this many tokens (default: no truncation)")
    add_loading(g, DTYPES, "int8 linear layers (CPU; close to float32's output, not equal): int8 weight-only, w8a8 "
                           "with int8 activations too")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding step: a slow first batch (9-60 s on CPU), faster later ones "
                        "(default: once the eager decoding has taken as long as compiling takes)")

    s = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching (pip install "
                                     "'nanoflant5[serve]')")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or hub id (default {DEFAULT_MODEL})")
    s.add_argument("--adapter", help=ADAPTER_HELP)
    s.add_argument("--served-model-name", dest="served_model_name", help="the name clients use (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    for flag, default, text in [("max-batch-size", 32, "rows decoded together"),
                                ("max-queue", 128, "requests waiting beyond the batch before 429"),
                                ("max-input-length", 512, "the longest prompt, in tokens"),
                                ("max-new-tokens", 512, "the most tokens a request may ask for")]:
        s.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int, default=default, help=text)
    add_loading(s)

    t = sub.add_parser("train", help="fine-tune on a JSONL or TSV file (torchrun for several processes)")
    t.add_argument("--model", required=True, help="folder or hub id to start from")
    t.add_argument("--data", required=True, help="JSONL (input/target fields) or TSV (input, target)")
    t.add_argument("--output", required=True, help="run folder: checkpoints, metrics.jsonl, the final model")
    t.add_argument("--eval-data", "--eval_data", dest="eval_data")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    for flag, kind, default, text in [
            ("batch-size", int, 8, "examples per process per micro-batch"),
            ("grad-accum", int, 1, "micro-batches per optimizer step"),
            ("lr", float, 3e-4, "peak learning rate"), ("warmup-steps", int, 0, "linear warm-up steps"),
            ("weight-decay", float, 0.0, None), ("max-grad-norm", float, 1.0, "gradient clipping (0: off)"),
            ("max-input-length", int, 512, "tokens"), ("max-target-length", int, 128, "tokens"),
            ("dropout", float, None, "overrides the checkpoint's dropout rate"),
            ("eval-every", int, 0, "steps (0: at the end)"), ("save-every", int, 0, "steps (0: at the end)"),
            ("seed", int, 0, None), ("input-field", str, None, "JSONL field of the input"),
            ("target-field", str, None, "JSONL field of the target"),
            ("tokenizer", str, None, "tokenizer folder or hub id (default: the model's)")]:
        t.add_argument(f"--{flag}", f"--{flag.replace('-', '_')}", dest=flag.replace("-", "_"), type=kind,
                       default=default, help=text)
    t.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=0,
                   help="train LoRA adapters of this rank on the frozen model (default 0: full fine-tuning)")
    t.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=float, default=8.0,
                   help="the adapters' update is scaled by alpha / r (default 8)")
    t.add_argument("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float, default=0.0)
    t.add_argument("--lora-targets", "--lora_targets", dest="lora_targets", default="q,v",
                   help="projections to adapt: q,k,v,o,wi_0,wi_1,wo (wi when not gated) or all-linear (default q,v)")
    t.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant")
    t.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast with float32 master weights")
    for flag, text in [("grad-checkpointing", "recompute activations in backward (less memory)"),
                       ("resume", "continue from the newest checkpoint in --output"),
                       ("overwrite", "replace an existing --output folder"),
                       ("from-scratch", "random weights for the model's config.json"),
                       ("fsdp", "shard the model over processes (FSDP2) instead of replicating it (DDP)"),
                       ("lora-rslora", "rank-stabilised LoRA: scale by alpha / sqrt(r)"),
                       ("merge", "LoRA: also write the merged model to OUTPUT/merged")]:
        t.add_argument(f"--{flag}", f"--{flag.replace('-', '_')}", dest=flag.replace("-", "_"), action="store_true",
                       help=text)

    c = sub.add_parser("compare", help="the same prompts through nanoflant5 and transformers: how often the outputs "
                                       "are identical (pip install transformers)")
    c.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or hub id (default {DEFAULT_MODEL})")
    c.add_argument("--data", required=True, help="JSONL (a prompt, input, text or question field) or text file")
    c.add_argument("--num-beams", dest="num_beams", type=int, default=1)
    c.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=100)
    c.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    c.add_argument("--limit", type=int, help="the first N prompts")
    add_loading(c, quantize_help="nanoflant5's side in int8 (see generate --help)")
    c.add_argument("--show", type=int, default=20, help="print the texts of this many that differ")
    c.add_argument("--output", help="write every comparison as JSONL")

    e = sub.add_parser("eval", help="lm-evaluation-harness tasks (mmlu, gsm8k, ...) on the model (pip install "
                                    "'nanoflant5[eval]')")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or hub id (default {DEFAULT_MODEL})")
    e.add_argument("--adapter", help=ADAPTER_HELP)
    e.add_argument("--tasks", required=True, help="lm-eval task or group names, comma-separated (mmlu,gsm8k)")
    e.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int,
                   help="examples before each question (default: the task's)")
    e.add_argument("--limit", type=int, help="the first N questions of each task")
    e.add_argument("--data", help="read the tasks' rows from this folder instead of the hub: mmlu/{dev,test}/"
                                  "SUBJECT_{dev,test}.csv (Hendrycks' CSVs), gsm8k/*test*.jsonl (and *train*)")
    e.add_argument("--output", help="write lm-eval's results JSON here")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    e.add_argument("--max-length", dest="max_length", type=int,
                   help="longer prompts lose their beginning (default: the tokenizer's, 512 for FLAN-T5)")
    add_loading(e)
    for command in (g, s, t, c, e):  # (also after the command: nanoflant5 generate ... --debug)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def add_loading(command, dtypes=DTYPES + ("float64",), quantize_help="int8 linear layers (see generate --help)"):
    """--device, --dtype and --quantize: how a command loads the model."""
    command.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    command.add_argument("--dtype", choices=dtypes, default="float32")
    command.add_argument("--quantize", choices=QUANTIZE, help=quantize_help)


def early_stopping_value(text: str):
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")
    return values[text.lower()]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.input_file:
        try:
            with open(args.input_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UsageError(f"--input-file {args.input_file}: {e.strerror}") from e
        for number, line in enumerate(raw.splitlines(), start=1):
            try:
                prompts.append(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UsageError(f"--input-file {args.input_file}:{number}: not UTF-8 ({e.reason})") from e
    if not prompts:
        raise UsageError("give at least one --prompt or an --input-file")
    return prompts


GENERATION_ARGS = ("max_new_tokens", "min_new_tokens", "num_beams", "num_return_sequences", "length_penalty",
                   "early_stopping", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
                   "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size")


def generation_settings(args, defaults):
    """The generation settings the command line asks for over `defaults` (a GenerationConfig), checked."""
    given = {name: getattr(args, name) for name in GENERATION_ARGS}
    if given["max_new_tokens"] is None and defaults.max_new_tokens is None and defaults.max_length is None:
        given["max_new_tokens"] = 128
    settings = defaults.update(**given)
    try:
        settings.check()
    except ValueError as e:  # "max_new_tokens must be ..." -> "--max-new-tokens must be ..."
        name, rest = str(e).split(" ", 1)
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from e
    if args.stream and (settings.num_beams > 1 or settings.num_return_sequences > 1):
        raise UsageError("--stream works with greedy decoding and sampling (one sequence per prompt), not beams")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return settings


def cmd_generate(args) -> int:
    from .config import GenerationConfig

    generation_settings(args, GenerationConfig())  # misuse is reported before anything is loaded
    check_quantize(args)
    prompts = read_prompts(args)
    import torch

    from . import T5, Tokenizer

    device = pick_device(args)
    model_name = f"google/flan-t5-{args.model_size}" if args.model_size else (args.model or DEFAULT_MODEL)
    model = T5.from_pretrained(model_name, dtype=getattr(torch, args.dtype), device=device, quantize=args.quantize,
                               adapter=args.adapter)
    tokenizer = Tokenizer.from_pretrained(model_name)
    settings = vars(generation_settings(args, model.generation_config))
    rng = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)

    if args.stream:
        for prompt in prompts:
            ids, mask = tokenizer.encode([prompt], max_length=args.max_input_length)
            stream_text(model.stream(ids.to(device), mask.to(device), generator=rng, compile=args.compile,
                                     **settings), tokenizer)
        return 0

    # Decode in batches of similar length (less padding); outputs do not depend on the batch, order is restored.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[tuple[str, float]]] = [[] for _ in prompts]
    n = settings["num_return_sequences"]
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        ids, mask = tokenizer.encode([prompts[i] for i in chunk], max_length=args.max_input_length)
        rows, scores = model.generate(ids.to(device), mask.to(device), generator=rng, return_scores=True,
                                      compile=args.compile, **settings)
        texts = tokenizer.batch_decode(rows.cpu())
        for j, i in enumerate(chunk):
            outputs[i] = list(zip(texts[j * n:(j + 1) * n], scores[j * n:(j + 1) * n].tolist()))
    for i, rows in enumerate(outputs):
        for text, score in rows:
            print(json.dumps({"prompt": i, "text": text, "score": score}, ensure_ascii=False) if args.json else text,
                  flush=True)
    return 0


def stream_text(token_steps, tokenizer):
    """Print the text of one sequence as its tokens arrive, ending with exactly the text generate() would print."""
    from .tokenizer import TextStream

    text = TextStream(tokenizer)
    for tokens in token_steps:
        print(text.push(int(tokens[0])), end="", flush=True)
    print(text.end(), flush=True)


def cmd_train(args) -> int:
    from pathlib import Path

    from .train import TrainArgs, check_args, train

    settings = TrainArgs(**{k: v for k, v in vars(args).items() if k not in ("command", "debug")})
    try:  # bad values, or a run folder that is there without --resume/--overwrite: misuse
        check_args(settings, Path(settings.output))
    except (ValueError, FileExistsError) as e:
        raise UsageError(str(e)) from e
    return train(settings)


def pick_device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_at_least_one(args, *names):
    """Integer options that must be >= 1 when given."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_quantize(args):
    if args.quantize and args.dtype != "float32":
        raise UsageError(f"--quantize {args.quantize} keeps the model's float parts in float32: it cannot be "
                         f"combined with --dtype {args.dtype}")


def cmd_serve(args) -> int:
    check_quantize(args)
    check_at_least_one(args, "max_batch_size", "max_queue", "max_input_length", "max_new_tokens")
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"serving needs {' and '.join(missing)}: pip install 'nanoflant5[serve]'")
    import torch

    from .serve import serve

    device = pick_device(args)
    return serve(args.model, args.host, args.port, args.max_batch_size, args.max_queue, args.max_input_length,
                 args.max_new_tokens, getattr(torch, args.dtype), device, args.served_model_name, args.quantize,
                 args.adapter)


def cmd_compare(args) -> int:
    import importlib.util

    check_at_least_one(args, "num_beams", "max_new_tokens", "batch_size", "limit")
    check_quantize(args)
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("compare runs transformers beside nanoflant5: pip install transformers")
    import torch

    from .compare import compare, read_prompts, report, write_jsonl

    try:
        prompts = read_prompts(args.data)[:args.limit]
    except OSError as e:
        raise UsageError(f"--data {args.data}: {e.strerror}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {e}") from e
    device = pick_device(args)
    results = compare(args.model, prompts, args.num_beams, args.max_new_tokens, getattr(torch, args.dtype),
                      args.batch_size, device, args.quantize)
    print(report(results, args.show))
    if args.output:
        write_jsonl(results, args.output)
    return 0


def cmd_eval(args) -> int:
    import importlib.util
    from pathlib import Path

    check_at_least_one(args, "limit", "batch_size", "max_length")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # (before the hours of evaluation)
        raise UsageError(f"--output {args.output}: no such folder {Path(args.output).parent}")
    check_quantize(args)
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("eval runs lm-evaluation-harness: pip install 'nanoflant5[eval]'")
    from .evaluate import EvalError, evaluate, quiet_lm_eval, report, to_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks names no task")
    quiet_lm_eval()
    try:
        results = evaluate(args.model, tasks, data=args.data, num_fewshot=args.num_fewshot, limit=args.limit,
                           batch_size=args.batch_size, dtype=args.dtype, device=pick_device(args),
                           max_length=args.max_length, quantize=args.quantize, adapter=args.adapter)
    except EvalError as e:
        raise UsageError(str(e)) from e
    print(report(results))
    if args.output:
        from .load import write_atomically

        text = to_json(results)
        write_atomically(args.output, lambda path: path.write_text(text, encoding="utf-8"))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "train": cmd_train, "serve": cmd_serve,
                "compare": cmd_compare, "eval": cmd_eval}[args.command](args)
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback; --debug shows it
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
