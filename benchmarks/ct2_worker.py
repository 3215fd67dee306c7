"""CTranslate2 timing worker for bench.py: a process that imports ctranslate2 and nothing of torch.

Measured here: once CTranslate2 has run in a process, torch in that process is ~40% slower, and torch's presence
slows CTranslate2 too, so each runs in its own process. Reads one JSON request per line ({"src": [[token ids]],
"beams": n, "new": n}), answers {"seconds": s, "rows": [[generated ids]]}; it times each call itself.
"""

import json
import sys
import time
from pathlib import Path

import ctranslate2


def main(ct2_dir: str, threads: int, compute_type: str = "default"):
    tr = ctranslate2.Translator(ct2_dir, device="cpu", intra_threads=threads, inter_threads=1,
                                compute_type=compute_type)
    vocab_file = next(Path(ct2_dir).glob("shared_vocabulary.*"))
    vocab = (json.loads(vocab_file.read_text()) if vocab_file.suffix == ".json"
             else vocab_file.read_text(encoding="utf-8").split("\n"))
    index = {t: i for i, t in enumerate(vocab)}
    for line in sys.stdin:
        request = json.loads(line)
        src = [[vocab[i] for i in row] for row in request["src"]]
        start = time.perf_counter()
        res = tr.translate_batch(src, beam_size=request["beams"], max_decoding_length=request["new"],
                                 min_decoding_length=request["new"])
        seconds = time.perf_counter() - start
        rows = [[index.get(t, -1) for t in r.hypotheses[0]] for r in res]
        print(json.dumps({"seconds": seconds, "rows": rows}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
