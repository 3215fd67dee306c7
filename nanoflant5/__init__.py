"""nanoflant5: a small, readable PyTorch implementation of FLAN-T5 / T5 that generates what transformers does."""

from .config import PRESETS, T5Config
from .generate import generate
from .load import load_model
from .model import T5
from .tokenizer import Tokenizer

__all__ = ["T5", "T5Config", "PRESETS", "Tokenizer", "generate", "load_model"]
__version__ = "0.1.0"
