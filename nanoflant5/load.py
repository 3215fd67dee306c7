"""Loading Hugging Face T5 checkpoints: resolve a folder or hub id, build the model on the meta device, read each
tensor straight into its final place (no second copy of the weights), check every name and shape.

Layouts read: model.safetensors, sharded safetensors (model.safetensors.index.json), pytorch_model.bin (and its
sharded index). The name map below is the whole correspondence between the checkpoint's names and ours.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from .config import PRESETS, GenerationConfig, T5Config
from .model import T5

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Checkpoint tensors that carry nothing of their own: copies of `shared.weight`, and a cross-attention position
# bias that T5 never uses.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def checkpoint_names(config: T5Config) -> dict[str, list[str]]:
    """Our parameter name -> the checkpoint tensors it is made of, concatenated along dim 0 (fused projections)."""
    names = {"shared.weight": ["shared.weight"], "lm_head.weight": ["lm_head.weight"]}
    for stack, depth in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        names[f"{stack}.relative_bias.embedding.weight"] = [
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        names[f"{stack}.final_norm.weight"] = [f"{stack}.final_layer_norm.weight"]
        for i in range(depth):
            hf, ours = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
            names[ours + "attn_norm.weight"] = [hf + "0.layer_norm.weight"]
            names[ours + "attn.qkv.weight"] = [hf + f"0.SelfAttention.{p}.weight" for p in "qkv"]
            names[ours + "attn.o.weight"] = [hf + "0.SelfAttention.o.weight"]
            ffn = 1
            if stack == "decoder":
                names[ours + "cross_norm.weight"] = [hf + "1.layer_norm.weight"]
                names[ours + "cross.q.weight"] = [hf + "1.EncDecAttention.q.weight"]
                names[ours + "cross.kv.weight"] = [hf + f"1.EncDecAttention.{p}.weight" for p in "kv"]
                names[ours + "cross.o.weight"] = [hf + "1.EncDecAttention.o.weight"]
                ffn = 2
            names[ours + "ffn_norm.weight"] = [hf + f"{ffn}.layer_norm.weight"]
            wi = ("wi_0", "wi_1") if config.gated else ("wi",)
            names[ours + "ffn.wi.weight"] = [hf + f"{ffn}.DenseReluDense.{p}.weight" for p in wi]
            names[ours + "ffn.wo.weight"] = [hf + f"{ffn}.DenseReluDense.wo.weight"]
    return names


# ---------------------------------------------------------------------------------------------------- locating


def resolve(name_or_path: str | os.PathLike, files: list[str] | None = None) -> Path:
    """A local folder, or a hub id (google/flan-t5-base; a bare preset name like flan-t5-base means google/...)
    fetched into / read from huggingface_hub's cache: only `files` if given, else config, tokenizer and weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name}: not a folder (expected a folder with config.json and weights)")
    if name in PRESETS:
        name = f"google/{name}"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name}: no such folder, and not a hub id (like google/flan-t5-base)")
    return _download(name, files)


def _download(repo_id: str, files: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    common = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "spiece.model"]
    try:
        if files is not None:
            return Path(snapshot_download(repo_id, allow_patterns=files))
        folder = Path(snapshot_download(repo_id, allow_patterns=common + ["*.safetensors", "*.safetensors.index.json"]))
        if not any((folder / f).exists() for f in WEIGHT_FILES):  # repos that only publish PyTorch pickles
            folder = Path(snapshot_download(repo_id, allow_patterns=common + ["*.bin", "*.bin.index.json"]))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: not in the local hub cache and the hub cannot be reached "
                                f"(offline?), and no local folder has that name: download it once with network "
                                f"access, or pass a local folder") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: no such local folder, nor a model on the hub (or it is private)") from e
    return folder


# ---------------------------------------------------------------------------------------------------- reading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """A .safetensors file read with plain file reads (no mmap), so a tensor can land directly in its final
    buffer. Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, data."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                raise ValueError(f"{path}: not a safetensors file, or truncated (header runs past the end)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, {}
        for name, e in header.items():
            dtype = SAFETENSORS_DTYPES.get(e.get("dtype"))
            begin, end = e["data_offsets"]
            numel = 1
            for s in e["shape"]:
                numel *= s
            if dtype is None or end - begin != numel * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} has a bad dtype or size in the header")
            if self.start + end > size:
                raise ValueError(f"{path}: truncated: tensor {name} ends at byte {self.start + end}, file has {size}")
            self.entries[name] = (dtype, tuple(e["shape"]), self.start + begin)

    def shape(self, name):
        return self.entries[name][1]

    def read_into(self, name, out: torch.Tensor):
        """Copy tensor `name` into `out` (same shape), reading bytes straight into it when dtype and device allow."""
        dtype, shape, offset = self.entries[name]
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            view = buf.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(view) != view.nbytes:
                raise ValueError(f"{self.path}: truncated while reading {name}")
        if not direct:
            out.copy_(buf)


class TorchFile:
    """pytorch_model.bin, loaded with weights_only=True (no code runs) and mmap (no copy until we read)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a damaged zip/pickle
            raise ValueError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
        self.entries = self.tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read_into(self, name, out):
        out.copy_(self.tensors[name])


def open_checkpoint(folder: Path) -> dict:
    """tensor name -> the file object that holds it."""
    for index, reader in (("model.safetensors.index.json", SafetensorsFile),
                          ("pytorch_model.bin.index.json", TorchFile)):
        if (folder / index).exists():
            with open(folder / index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = {}
            for fname in sorted(set(weight_map.values())):
                if not (folder / fname).exists():
                    raise FileNotFoundError(f"{folder / fname}: shard listed in {index} is missing")
                files[fname] = reader(folder / fname)
            return {name: files[fname] for name, fname in weight_map.items()}
    for fname, reader in (("model.safetensors", SafetensorsFile), ("pytorch_model.bin", TorchFile)):
        if (folder / fname).exists():
            f = reader(folder / fname)
            return {name: f for name in f.entries}
    raise FileNotFoundError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


# ---------------------------------------------------------------------------------------------------- building


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The float16 policy, in this one place: FLAN-T5's feed-forward outputs overflow float16 (inf, then NaN), so
    under float16 the output projections `wo` stay float32 (model.py casts their input), as in transformers."""
    return torch.float32 if dtype == torch.float16 and name.endswith("ffn.wo.weight") else dtype


def load_model(name_or_path, dtype=None, device=None, quantize=None, adapter=None) -> T5:
    """Read config.json and the weights of a T5 checkpoint into a T5 in eval mode (float32 unless dtype is given;
    quantize="int8" or "w8a8": int8 linear layers, see quantize.py; adapter: a peft LoRA adapter folder, merged into
    the weights as they are read, see lora.py)."""
    if quantize is not None:  # checked before anything is read
        from .quantize import check_mode
        check_mode(quantize)
        if dtype not in (None, torch.float32):
            raise ValueError(f"quantize={quantize!r} keeps the model's float parts in float32; dtype={dtype} cannot be "
                             f"combined")
    folder = resolve(name_or_path)
    if not (folder / "config.json").exists():
        if (folder / "adapter_config.json").exists():
            raise FileNotFoundError(f"{folder}: a LoRA adapter, not a model: load its base model with adapter={folder}"
                                    f" (--adapter {folder})")
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder?)")
    config = T5Config.from_json(folder / "config.json")
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    updates = {}
    if adapter is not None:  # checked before the weights are read
        from .lora import read_adapter
        updates = read_adapter(adapter, config)
    files = open_checkpoint(folder)

    names = checkpoint_names(config)
    untied = "lm_head.weight" in files
    if not untied:
        if not config.tie_word_embeddings:
            raise ValueError(f"{folder}: missing tensor lm_head.weight (config says the output layer is untied)")
        del names["lm_head.weight"]
    missing = [n for parts in names.values() for n in parts if n not in files]
    wanted = {n for parts in names.values() for n in parts}
    unexpected = [n for n in files if n not in wanted and n not in IGNORED]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match config.json: "
                         + "; ".join(f"{what} {len(lst)} tensors: {', '.join(lst[:8])}{' ...' if len(lst) > 8 else ''}"
                                     for what, lst in (("missing", missing), ("unexpected", unexpected)) if lst))

    with torch.device("meta"):
        model = T5(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    state, bad = {}, []
    for ours, parts in names.items():
        expected = tuple(params[ours].shape)
        part_shape = (expected[0] // len(parts), *expected[1:])  # fused parts split dim 0 evenly
        shapes = [tuple(files[p].shape(p)) for p in parts]
        if any(s != part_shape for s in shapes):
            bad.extend(f"{p} {list(s)} (expected {list(part_shape)})" for p, s in zip(parts, shapes) if s != part_shape)
            continue
        tensor = torch.empty(expected, dtype=param_dtype(ours, dtype), device=device)
        whole = tensor if ours not in updates else torch.empty(expected, dtype=torch.float64)  # W + s B A in float64
        for i, p in enumerate(parts):  # fused projections: each part fills its own rows
            files[p].read_into(p, whole[i * part_shape[0]:(i + 1) * part_shape[0]])
        for start, end, update in updates.get(ours, []):
            whole[start:end] += update
        state[ours] = tensor.copy_(whole) if whole is not tensor else tensor
    if bad:
        raise ValueError(f"{folder}: tensors with the wrong shape for config.json: {', '.join(bad[:8])}"
                         f"{' ...' if len(bad) > 8 else ''}")
    if not untied:
        state["lm_head.weight"] = state["shared.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if untied and torch.equal(model.lm_head.weight, model.shared.weight):
        untied = False  # original T5 checkpoints store the tied head twice
    if untied:
        config.tie_word_embeddings = False
    else:
        model.lm_head.weight = model.shared.weight
    model.generation_config = GenerationConfig.from_folder(folder)
    if quantize is not None:
        from .quantize import quantize as to_quantized
        to_quantized(model, quantize)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- saving


def write_atomically(path, write):
    """write(temporary path), force it to disk, then rename it over `path`: whoever reads `path` finds the old file
    or the complete new one, never half of one (the rename is atomic within a folder). The temporary file is the
    process's own, so that processes writing the same file at once do not write into each other's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model: T5, folder) -> Path:
    """Write `model` in the Hugging Face layout (config.json, generation_config.json, model.safetensors), readable
    by T5.from_pretrained and transformers' T5ForConditionalGeneration. Fused projections are split back; a tied
    output layer is not written twice. Each file is written atomically."""
    import dataclasses

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tied = model.lm_head.weight is model.shared.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, parts in checkpoint_names(config).items():
        if tied and ours == "lm_head.weight":
            continue
        for part, tensor in zip(parts, params[ours].detach().chunk(len(parts), dim=0)):
            tensors[part] = tensor.to("cpu", copy=True).contiguous()
    hf_config = dict(config.to_hf_dict(), tie_word_embeddings=tied)
    defaults = dataclasses.asdict(GenerationConfig())
    generation = {k: v for k, v in dataclasses.asdict(model.generation_config).items() if v != defaults[k]}
    generation.update(decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
                      pad_token_id=config.pad_token_id)
    write_atomically(folder / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomically(folder / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    write_atomically(folder / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2) + "\n"))
    return folder
