"""Command line: a thin layer over the Python API.

    nanoflant5 generate --model google/flan-t5-base --prompt "Translate to German: Hello" --num-beams 4
"""

from __future__ import annotations

import argparse
import sys
import traceback

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "google/flan-t5-base"


class UsageError(Exception):
    """Misuse of the command line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoflant5", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    which = g.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"local folder or hub id (default {DEFAULT_MODEL})")
    which.add_argument("--model-size", "--model_size", dest="model_size",
                       choices=("small", "base", "large", "xl", "xxl"), help="google/flan-t5-SIZE")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--input-file", "--input_file", dest="input_file", help="a file with one prompt per line")
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128)
    g.add_argument("--min-new-tokens", "--min_new_tokens", dest="min_new_tokens", type=int, default=0)
    g.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1)
    g.add_argument("--num-return-sequences", "--num_return_sequences", dest="num_return_sequences", type=int,
                   default=1)
    g.add_argument("--length-penalty", "--length_penalty", dest="length_penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", "--early_stopping", dest="early_stopping", nargs="?", const=True,
                   default=False, type=early_stopping_value, metavar="{true,false,never}",
                   help="beam search: stop once num_beams hypotheses are finished ('never': canonical search)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="prompts decoded together")
    g.add_argument("--max-input-length", "--max_input_length", dest="max_input_length", type=int, default=None,
                   help="truncate prompts to this many tokens (default: no truncation)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    return parser


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


def check_args(args):
    from .generate import check_generate_args

    try:
        check_generate_args(args.max_new_tokens, args.min_new_tokens, args.num_beams, args.num_return_sequences,
                            args.early_stopping)
    except ValueError as e:  # "max_new_tokens must be ..." -> "--max-new-tokens must be ..."
        name, rest = str(e).split(" ", 1)
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from e
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")


def cmd_generate(args) -> int:
    check_args(args)
    prompts = read_prompts(args)
    import torch

    from . import T5, Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_name = f"google/flan-t5-{args.model_size}" if args.model_size else (args.model or DEFAULT_MODEL)
    model = T5.from_pretrained(model_name, dtype=getattr(torch, args.dtype), device=device)
    tokenizer = Tokenizer.from_pretrained(model_name)

    # Decode in batches of similar length (less padding); outputs do not depend on the batch, order is restored.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        ids, mask = tokenizer.encode([prompts[i] for i in chunk], max_length=args.max_input_length)
        rows = model.generate(ids.to(device), mask.to(device), max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
                              length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                              num_return_sequences=args.num_return_sequences)
        texts = tokenizer.batch_decode(rows.cpu())
        n = args.num_return_sequences
        for j, i in enumerate(chunk):
            outputs[i] = texts[j * n:(j + 1) * n]
    for texts in outputs:
        for text in texts:
            print(text, flush=True)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate}[args.command](args)
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
