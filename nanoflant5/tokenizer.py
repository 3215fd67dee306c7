"""The T5 tokenizer over the `tokenizers` library, built as transformers' AutoTokenizer builds it: from tokenizer.json,
or, for folders that only have SentencePiece's spiece.model, from the pieces and normalizer stored in that file."""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import Unigram

from .load import resolve

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"]
EXTRA_IDS = 100  # <extra_id_0> .. <extra_id_99>: the sentinels of T5's span corruption, at the top of the vocab


def _protobuf_fields(buf: bytes):
    """(field number, value) of a protobuf message: just enough of the wire format to read a SentencePiece model."""
    i = 0

    def varint():
        nonlocal i
        result = shift = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 1:
            yield field, buf[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield field, buf[i:i + n]
            i += n
        elif wire == 5:
            yield field, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_spiece(path: Path):
    """Pieces with scores, and the normalizer's precompiled character map, of a SentencePiece model file
    (sentencepiece_model.proto: ModelProto.pieces = 1 {piece = 1, score = 2}, normalizer_spec = 3
    {precompiled_charsmap = 2})."""
    pieces, charsmap = [], None
    try:
        for field, value in _protobuf_fields(path.read_bytes()):
            if field == 1:
                piece = dict(_protobuf_fields(value))
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0]))
            elif field == 3:
                charsmap = dict(_protobuf_fields(value)).get(2)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
    return pieces, charsmap


def spiece_backend(path: Path) -> Backend:
    pieces, charsmap = read_spiece(path)
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)]  # <extra_id_0> gets the last id
    tok = Backend(Unigram(pieces + [(t, 0.0) for t in extra], unk_id=2, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [p for p, _ in pieces[:3]] + extra])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok


class Tokenizer:
    def __init__(self, folder: str | Path, pad_token_id: int = 0, eos_token_id: int = 1):
        folder = Path(folder)
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        if (folder / "tokenizer.json").exists():
            self._tok = Backend.from_file(str(folder / "tokenizer.json"))
            self._tok.no_padding()
            self._tok.no_truncation()
        elif (folder / "spiece.model").exists():
            self._tok = spiece_backend(folder / "spiece.model")
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer (expected tokenizer.json or spiece.model)")
        # Split on whitespace first, as SentencePiece itself and transformers >= 5 do: re-saved tokenizer.json files
        # otherwise keep a trailing space, or the space before an <extra_id_N>, as a token of its own.
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        return cls(resolve(name_or_path, TOKENIZER_FILES))

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, ending with </s> (not with add_special_tokens=False), as AutoTokenizer(text)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_rows(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, ending with </s>; max_length truncates, keeping the final </s>."""
        rows = [e.ids for e in self._tok.encode_batch(list(texts))]
        if max_length is not None:
            rows = [r if len(r) <= max_length else r[:max_length - 1] + [self.eos_token_id] for r in rows]
        return rows

    def encode(self, texts: str | list[str], max_length: int | None = None):
        """Batch encode, right-padded: (input_ids, attention_mask), both LongTensor [batch, longest]."""
        return pad_rows(self.encode_rows([texts] if isinstance(texts, str) else texts, max_length), self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def token_text(self, token_id: int) -> str:
        """One token's own text (its SentencePiece piece, word boundary as a space), as servers report tokens."""
        return (self._tok.id_to_token(token_id) or "").replace("\u2581", " ")


def pad_rows(rows, pad_token_id: int = 0, device=None):
    """Rows of token ids -> right-padded (input_ids, attention_mask), both LongTensor [batch, longest]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


class TextStream:
    """The text of one sequence as its tokens arrive: push() returns the new text (T5's pieces decode to whole
    characters, and a piece does not change the text before it; whatever would not extend the text shown so far is
    held back, as are the last `hold` characters: a server holds back what could be the start of a stop string),
    end() the rest, so that the pieces add up to exactly decode(ids)."""

    def __init__(self, tokenizer: Tokenizer, hold: int = 0):
        self.tokenizer, self.hold, self.ids, self.shown, self.text = tokenizer, hold, [], "", ""

    def push(self, token_id: int) -> str:
        self.add(token_id)
        return self.release()

    def add(self, token_id: int):
        """Take a token (self.text is the whole text so far) without releasing text yet."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)

    def release(self) -> str:
        ready = self.text[:max(0, len(self.text) - self.hold)]
        if len(ready) > len(self.shown) and ready.startswith(self.shown):
            return self.end(ready)
        return ""

    def end(self, text: str | None = None) -> str:
        """The rest of the text (or of `text`: the text cut at a stop string)."""
        text = self.text if text is None else text
        new, self.shown = text[len(self.shown):], text
        return new
