"""Write a toy task for the training example: reverse a list of words.

    python examples/reverse_words.py examples/data      # -> train.jsonl (4000), eval.jsonl (200)

Inputs look like {"input": "reverse: red cat sings", "target": "sings cat red"}; a tiny T5 trained from scratch
(examples/tiny-t5) learns it to near-perfect exact match in a few minutes on a laptop CPU.
"""

import json
import random
import sys
from pathlib import Path

WORDS = ("red green blue cat dog bird sings runs jumps big small old new happy sad fast slow tree river stone "
         "sun moon star rain snow wind").split()


def examples(n: int, rng: random.Random, min_words: int = 2, max_words: int = 5):
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(min_words, max_words))
        yield {"input": "reverse: " + " ".join(words), "target": " ".join(reversed(words))}


def main(folder: str, n_train: int = 4000, n_eval: int = 200, seed: int = 0):
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in (("train.jsonl", n_train), ("eval.jsonl", n_eval)):
        with open(out / name, "w", encoding="utf-8") as f:
            for ex in examples(n, rng):
                f.write(json.dumps(ex) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data")
