"""Write a toy task for the training example: reverse a list of words.

    python examples/reverse_words.py examples/data      # -> train.jsonl (2000 examples), eval.jsonl (100)

Rows look like {"input": "reverse: red cat sun", "target": "sun cat red"}. With the defaults (8 words, lists of 2-3)
a tiny T5 trained from scratch (examples/tiny-t5) reverses unseen lists after 500 steps (tests/test_train.py).
--vocab 26 --max-words 5 makes a harder version.
"""

import argparse
import json
import random
from pathlib import Path

WORDS = ("red blue cat dog sun moon tree rain green bird sings runs jumps big small old new happy sad fast slow "
         "river stone star snow wind").split()


def examples(n: int, seed: int = 0, vocab: int = 8, min_words: int = 2, max_words: int = 3):
    rng = random.Random(seed)
    for _ in range(n):
        words = rng.choices(WORDS[:vocab], k=rng.randint(min_words, max_words))
        yield {"input": "reverse: " + " ".join(words), "target": " ".join(reversed(words))}


def write(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="examples/data")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--vocab", type=int, default=8, help=f"how many words to draw from (at most {len(WORDS)})")
    p.add_argument("--min-words", type=int, default=2)
    p.add_argument("--max-words", type=int, default=3)
    a = p.parse_args()
    shape = dict(vocab=a.vocab, min_words=a.min_words, max_words=a.max_words)
    write(Path(a.folder) / "train.jsonl", examples(a.train, seed=0, **shape))
    write(Path(a.folder) / "eval.jsonl", examples(a.eval, seed=1, **shape))


if __name__ == "__main__":
    main()
