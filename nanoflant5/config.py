"""Configuration, one dataclass each: the architecture (T5Config, from config.json) and the generation settings
(GenerationConfig, from generation_config.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Activations named by config.json's feed_forward_proj ("gated-gelu" -> "gelu_new", as transformers maps it).
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
MODEL_TYPES = ("t5", "mt5")  # same checkpoint layout and architecture


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head size; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6  # encoder depth
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    activation: str = "relu"  # of the feed-forward layer
    gated: bool = False  # T5 v1.1 / FLAN-T5: act(x W0) * (x W1); original T5: act(x W)
    tie_word_embeddings: bool = True  # original T5 shares the output layer with the embedding
    scale_decoder_outputs: bool = True  # original T5 scales the decoder output by d_model**-0.5 before the tied head
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        """Read the fields of a transformers T5Config dict, checking what this implementation supports."""
        model_type = d.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}, not a T5 model (expected one of {MODEL_TYPES})")
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        gated = parts[0] == "gated"
        if (gated and len(parts) != 2) or (not gated and len(parts) != 1):
            raise ValueError(f"unsupported feed_forward_proj {proj!r} (expected 'ACT' or 'gated-ACT')")
        activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {proj!r}: activation {activation!r} not in {ACTIVATIONS}")
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ValueError(f"eos_token_id {eos} lists several tokens; one end-of-sequence token is supported")
            eos = eos[0]
        tie = d.get("tie_word_embeddings", True)
        num_layers = d.get("num_layers", 6)
        return cls(
            vocab_size=d.get("vocab_size", 32128),
            d_model=d.get("d_model", 512),
            d_kv=d.get("d_kv", 64),
            d_ff=d.get("d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=d.get("num_decoder_layers") or num_layers,
            num_heads=d.get("num_heads", 8),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            dropout_rate=d.get("dropout_rate", 0.1),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            activation=activation,
            gated=gated,
            tie_word_embeddings=tie,
            # transformers >= 5 writes this key; older configs imply it from tie_word_embeddings.
            scale_decoder_outputs=d.get("scale_decoder_outputs", tie),
            pad_token_id=d.get("pad_token_id", 0),
            eos_token_id=eos,
            decoder_start_token_id=d.get("decoder_start_token_id", d.get("pad_token_id", 0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "T5Config":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' T5ForConditionalGeneration reads back as this model."""
        act = "gelu" if self.gated and self.activation == "gelu_new" else self.activation
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            **{k: v for k, v in dataclasses.asdict(self).items() if k not in ("activation", "gated")},
            "feed_forward_proj": f"gated-{act}" if self.gated else act,  # transformers reads gated-gelu as gelu_new
            "is_encoder_decoder": True,
        }


def _flan(d_model, d_ff, num_layers, num_heads) -> T5Config:
    return T5Config(d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=num_layers, num_decoder_layers=num_layers,
                    num_heads=num_heads, activation="gelu_new", gated=True, tie_word_embeddings=False,
                    scale_decoder_outputs=False)


# The published FLAN-T5 sizes (google/flan-t5-*), as their config.json files describe them.
PRESETS = {
    "flan-t5-small": _flan(512, 1024, 8, 6),
    "flan-t5-base": _flan(768, 2048, 12, 12),
    "flan-t5-large": _flan(1024, 2816, 24, 16),
    "flan-t5-xl": _flan(2048, 5120, 24, 32),
    "flan-t5-xxl": _flan(4096, 10240, 24, 64),
}


@dataclass
class GenerationConfig:
    """Generation settings with transformers' defaults. A checkpoint's generation_config.json (or, without one, the
    generation fields of its config.json) overrides them; explicit generate() arguments override both."""

    max_new_tokens: int | None = None  # None: max_length - 1 (the decoder start token counts in max_length)
    max_length: int | None = None  # with neither set, 20 new tokens (transformers' default)
    min_new_tokens: int = 0
    min_length: int = 0
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 50  # sampling only; 0 turns it off
    top_p: float = 1.0
    min_p: float | None = None  # sampling: see process_scores for these four
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    sequence_bias: list | dict | None = None  # [[token ids, bias], ...] or {(token ids): bias}: added to the last
    # token's score where the rest ends the row
    bad_words_ids: list[list[int]] | None = None  # token sequences never generated ([eos] is ignored)
    suppress_tokens: list[int] | None = None  # tokens never generated
    begin_suppress_tokens: list[int] | None = None  # tokens not generated first

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def from_folder(cls, folder: Path) -> "GenerationConfig":
        for name in ("generation_config.json", "config.json"):
            if (folder / name).exists():
                with open(folder / name, encoding="utf-8") as f:
                    return cls.from_dict(json.load(f))
        return cls()

    def update(self, **overrides) -> "GenerationConfig":
        """A copy with the arguments that are not None. max_new_tokens wins over max_length, as in transformers."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "max_length" in given and "max_new_tokens" not in given:
            given["max_new_tokens"] = None
        return dataclasses.replace(self, **given)

    @property
    def new_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 20 if self.max_length is None else self.max_length - 1

    @property
    def min_tokens(self) -> int:
        return max(self.min_new_tokens, self.min_length - 1)

    def check(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        if self.max_new_tokens is not None:
            integer("max_new_tokens", 1)  # transformers refuses 0 too
        elif self.max_length is not None:
            integer("max_length", 1)
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
            integer(name, 0)
        for name in ("num_beams", "num_return_sequences"):
            integer(name, 1)
        if self.top_k is not None:
            integer("top_k", 0)
        if self.num_return_sequences > self.num_beams and (self.num_beams > 1 or not self.do_sample):
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}): beam search returns its best beams, greedy decoding one sequence"
                             " per input (sampling with num_beams=1 may return several)")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.typical_p > 0.0:
            raise ValueError(f"typical_p must be > 0, got {self.typical_p!r}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.do_sample and not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.bad_words_ids is not None and not (
                isinstance(self.bad_words_ids, (list, tuple)) and self.bad_words_ids
                and all(seq and token_ids(seq) for seq in self.bad_words_ids)):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got "
                             f"{self.bad_words_ids!r}")
        if self.sequence_bias is not None:
            pairs = (list(self.sequence_bias.items()) if isinstance(self.sequence_bias, dict)
                     else self.sequence_bias if isinstance(self.sequence_bias, (list, tuple)) else None)
            if not pairs or not all(
                    isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[0] and token_ids(pair[0])
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) for pair in pairs):
                raise ValueError(f"sequence_bias must be a non-empty list of [token ids, bias] pairs (or a dict of "
                                 f"token-id tuples to biases), got {self.sequence_bias!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and not token_ids(value):
                raise ValueError(f"{name} must be a list of token ids, got {value!r}")

    def biased_sequences(self) -> tuple[tuple[tuple[int, ...], float], ...]:
        """sequence_bias as ((token ids), bias) pairs, the last of equal sequences winning, as in transformers."""
        pairs = self.sequence_bias.items() if isinstance(self.sequence_bias, dict) else self.sequence_bias or []
        return tuple({tuple(seq): float(bias) for seq, bias in pairs}.items())

    def named_tokens(self) -> set[int]:
        """Every token id the settings name (to check against the vocabulary)."""
        lists = [*(self.bad_words_ids or []), self.suppress_tokens or [], self.begin_suppress_tokens or [],
                 *(seq for seq, _ in self.biased_sequences())]
        return {t for ids in lists for t in ids}


def token_ids(value) -> bool:
    """Whether value is a list (or tuple) of token ids: non-negative ints, not bools."""
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in value)
