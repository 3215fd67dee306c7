"""A stand-in for the Hugging Face hub, for CI's newcomer check (no network here): `google/flan-t5-base` in
huggingface_hub's cache layout, with the real config and tokenizer (tests/fixtures; FLAN-T5's tokenizer is shared
by every size) and random weights written by nanoflant5 itself. Usage: python .ci/fake_hub.py CACHE_DIR"""

import shutil
import sys
from pathlib import Path

import torch

from nanoflant5 import T5
from nanoflant5.config import T5Config
from nanoflant5.load import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
repo = Path(sys.argv[1]) / "models--google--flan-t5-base"
snapshot = repo / "snapshots" / ("0" * 40)
torch.manual_seed(0)
model = T5(T5Config.from_json(ROOT / "tests/fixtures/flan-t5-base/config.json")).init_weights()
save_pretrained(model, snapshot)
for f in ["generation_config.json"]:
    shutil.copy(ROOT / "tests/fixtures/flan-t5-base" / f, snapshot / f)
for f in ["spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
    shutil.copy(ROOT / "tests/fixtures/flan-t5-small" / f, snapshot / f)
(repo / "refs").mkdir(exist_ok=True)
(repo / "refs" / "main").write_text("0" * 40)
