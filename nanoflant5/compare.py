"""`nanoflant5 compare`: the same prompts through nanoflant5 and through transformers (pip install transformers), and
how often the outputs are identical: the share of identical outputs, and for each one that differs, the position of
its first differing token and both texts. Greedy or beam search, as transformers' generate() does it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

PROMPT_KEYS = ("prompt", "input", "text", "question")


@dataclass
class Comparison:
    index: int
    prompt: str
    ours: str
    theirs: str
    first_difference: int | None  # the generated token (from 0) where the two first differ; None: identical


def read_prompts(path) -> list[str]:
    """Prompts from a JSONL file (each line an object with a prompt, input, text or question field) or a text file
    (one prompt a line)."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if str(path).endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
                key = next((k for k in PROMPT_KEYS if isinstance(row, dict) and k in row), None)
                if key is None:
                    raise ValueError(f"{path}:{number}: no {', '.join(PROMPT_KEYS[:-1])} or {PROMPT_KEYS[-1]} field")
                prompts.append(str(row[key]))
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def generated(row, eos: int, pad: int) -> list[int]:
    """The generated tokens of an output row: after the start token, up to and including </s>, no padding."""
    tokens = row.tolist()[1:]
    if eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (one ending earlier counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(model_name, prompts: list[str], num_beams: int = 1, max_new_tokens: int = 100, dtype=torch.float32,
            batch_size: int = 16, device: str = "cpu", quantize: str | None = None) -> list[Comparison]:
    """Generate every prompt with nanoflant5 (quantize: see T5.from_pretrained) and with transformers (in dtype, both
    in batches of similar length) and compare them token by token."""
    from transformers import T5ForConditionalGeneration

    from .load import resolve
    from .model import T5
    from .tokenizer import Tokenizer

    ours = T5.from_pretrained(model_name, dtype=dtype, device=device, quantize=quantize)
    theirs = T5ForConditionalGeneration.from_pretrained(resolve(model_name), dtype=dtype).to(device).eval()
    tokenizer = Tokenizer.from_pretrained(model_name)
    eos, pad = ours.config.eos_token_id, ours.config.pad_token_id
    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Comparison | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = tokenizer.encode([prompts[i] for i in batch])
        ids, mask = ids.to(device), mask.to(device)
        mine = ours.generate(ids, mask, **settings)
        with torch.no_grad():
            reference = theirs.generate(input_ids=ids, attention_mask=mask, **settings)
        for i, a, b in zip(batch, mine, reference):
            a, b = generated(a, eos, pad), generated(b, eos, pad)
            results[i] = Comparison(i, prompts[i], tokenizer.decode(a), tokenizer.decode(b), first_difference(a, b))
    return results


def report(results: list[Comparison], show: int = 20) -> str:
    """The share of identical outputs, the first differing positions, and the texts of up to `show` that differ."""
    differ = [r for r in results if r.first_difference is not None]
    same = len(results) - len(differ)
    lines = [f"identical: {same}/{len(results)} ({same / len(results):.1%})"]
    if differ:
        positions = sorted(r.first_difference for r in differ)
        lines.append(f"first differing token of the {len(differ)} that differ: median {positions[len(positions) // 2]}"
                     f", mean {sum(positions) / len(positions):.1f}")
    for r in differ[:show]:
        lines += [f"\n#{r.index} differs at token {r.first_difference}: {r.prompt[:100]!r}",
                  f"  nanoflant5:   {r.ours!r}", f"  transformers: {r.theirs!r}"]
    if len(differ) > show:
        lines.append(f"\n... and {len(differ) - show} more (--output writes them all)")
    return "\n".join(lines)


def write_jsonl(results: list[Comparison], path):
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
