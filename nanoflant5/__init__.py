"""nanoflant5: a small, readable PyTorch implementation of FLAN-T5 / T5 that generates what transformers does."""

from .config import PRESETS, GenerationConfig, T5Config
from .load import load_model
from .model import T5
from .tokenizer import Tokenizer

__all__ = ["T5", "T5Config", "GenerationConfig", "PRESETS", "Tokenizer", "load_model"]
__version__ = "0.1.0"
