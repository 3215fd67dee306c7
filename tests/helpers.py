"""Random-weight T5 checkpoints written by transformers, with weights large enough that outputs vary.

transformers' default init makes a random T5 repeat one token forever; with these gains (relative bias std 3,
feed-forward gain 2, norms in [0.5, 1.5], a boosted </s> row) greedy outputs use many tokens and end at different
lengths, so a wrong implementation cannot pass by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            decoder_start_token_id=0)

# name -> T5Config overrides; "untied" means a flan-like checkpoint with a separate lm_head.weight.
CONFIGS = {
    "gated-gelu-untied": dict(TINY, feed_forward_proj="gated-gelu", untied=True),
    "relu-tied": dict(TINY, feed_forward_proj="relu", untied=False),
    "unequal-depth": dict(TINY, feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=2, untied=True),
    "inner-dim": dict(TINY, feed_forward_proj="gated-silu", d_kv=12, num_heads=3, untied=True),
}


def randomize(model, seed: int, eos_boost: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "shared" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
            else:
                gain = 2.0 if "DenseReluDense" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
        model.lm_head.weight[model.config.eos_token_id] += eos_boost * model.lm_head.weight.std()


def make_checkpoint(folder, name: str = "gated-gelu-untied", seed: int = 0, fmt: str = "safetensors", **overrides):
    """Write a random checkpoint to `folder` in the HF layout and return transformers' model of it (float64, eval).

    fmt: "safetensors", "sharded" (several model-*.safetensors + index) or "bin" (pytorch_model.bin)."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    spec = dict(CONFIGS[name], **overrides)
    untied = spec.pop("untied")
    torch.manual_seed(seed)
    ref = T5ForConditionalGeneration(T5Config(**spec))
    if untied:  # like the published FLAN-T5 checkpoints: a separate output layer, no rescaling
        ref.lm_head.weight = torch.nn.Parameter(ref.shared.weight.detach().clone())
        ref.config.scale_decoder_outputs = False
    randomize(ref, seed)
    ref.eval()
    if fmt == "sharded":
        ref.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        ref.save_pretrained(folder)
        if fmt == "bin":
            state = {k: v.clone() for k, v in ref.state_dict().items()}
            (folder / "model.safetensors").unlink()
            torch.save(state, folder / "pytorch_model.bin")
    if untied:
        # transformers 5 drops the untied head when saving; write it (and the flag) as the FLAN-T5 files have them.
        _write_untied(folder, ref, fmt)
    return ref.double()


def _write_untied(folder: Path, ref, fmt: str):
    from safetensors.torch import save_file

    head = {"lm_head.weight": ref.lm_head.weight.detach().clone().contiguous()}
    if fmt == "bin":
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        state.update(head)
        torch.save(state, folder / "pytorch_model.bin")
    elif fmt == "sharded":
        save_file(head, folder / "model-head.safetensors", metadata={"format": "pt"})
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"]["lm_head.weight"] = "model-head.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        state.update(head)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def reference(folder):
    """transformers' model of a checkpoint folder, as a user would load it (float64 for comparisons)."""
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(folder).double().eval()


def random_batch(vocab_size: int, lengths, seed: int = 0):
    """Right-padded input ids (pad 0) with the given true lengths, ending in </s> (1)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n - 1] = torch.randint(2, vocab_size, (n - 1,), generator=g)
        ids[i, n - 1] = 1
        mask[i, :n] = 1
    return ids, mask


def random_labels(vocab_size: int, lengths, seed: int = 0):
    """Target ids [batch, max(lengths)] with -100 (ignored) past each row's length, as a loss expects them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, vocab_size, (len(lengths), max(lengths)), generator=g)
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    return labels


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server subprocess."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_with_tokenizer(folder, seed: int):
    """A tiny random model with FLAN-T5's 32128-token vocabulary and its real tokenizer files (tests/fixtures), for
    tests that go through text. Returns the folder."""
    import shutil

    make_checkpoint(folder, "gated-gelu-untied", seed=seed, vocab_size=32128)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(__file__).parent / "fixtures" / "flan-t5-small" / f, Path(folder) / f)
    return folder


def mmlu_rows(path) -> list[dict]:
    """An MMLU CSV (header question,choice0..choice3,answer; answer 0-3) as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mmlu_context(subject: str, shots: list[dict], row: dict) -> str:
    """lm-eval's MMLU prompt: the subject line, the shots with their answers, the question and "Answer:"."""

    def block(r, answer: bool) -> str:
        text = r["question"] + "".join(f"\n{l}. {r[f'choice{i}']}" for i, l in enumerate("ABCD")) + "\nAnswer:"
        return text + (f" {'ABCD'[int(r['answer'])]}\n\n" if answer else "")

    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(block(r, True) for r in shots) + block(row, False)


def lm_eval_hf(folder, **args):
    """lm-eval's hf model (backend=seq2seq) of a checkpoint, with the checkpoint's output layer: lm-eval 0.4.13 calls
    tie_weights() after loading, and transformers 5 reads FLAN-T5's config.json ("tie_word_embeddings": false) as
    tie_word_embeddings=True, scale_decoder_outputs=False, so the output layer becomes the input embedding. -> (the
    model, whether lm-eval had tied it)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import T5ForConditionalGeneration

    hf = HFLM(pretrained=str(folder), backend="seq2seq", **args)
    tied = torch.equal(hf.model.lm_head.weight, hf.model.shared.weight)
    head = T5ForConditionalGeneration.from_pretrained(folder, dtype=hf.model.dtype).lm_head.weight.detach().clone()
    hf.model.lm_head.weight = torch.nn.Parameter(head)
    return hf, tied
