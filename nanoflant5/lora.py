"""LoRA adapters, in Hugging Face peft's file layout: train them (train.py), save them, read them (merged into the
weights for decoding).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685): a frozen projection
W gains a trainable low-rank update, y = W x + s * B A dropout(x), A (r, in) drawn as nn.Linear's default
(kaiming-uniform, a = sqrt(5)), B (out, r) zero, s = alpha / r; rsLoRA (Kalajdzievski 2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732) scales by alpha / sqrt(r) instead. peft's
tuners/lora/layer.py is the reference for the math and the initialisation.

peft adapts transformers' modules: one (A, B) pair per projection q, k, v, o, wi_0, wi_1 (wi), wo. Our model fuses
q/k/v, cross-attention's k/v and wi_0/wi_1 into one Linear each, so a fused Linear carries one pair per projection,
each updating its own rows (load.checkpoint_names says which). Files: adapter_config.json and
adapter_model.safetensors with keys base_model.model.<transformers module>.lora_A.weight / .lora_B.weight, float32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .load import SafetensorsFile, checkpoint_names, resolve, write_atomically

PROJECTIONS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # transformers' names of T5's linear layers
PREFIX = "base_model.model."  # peft's prefix for a seq2seq model's keys


class AdapterError(ValueError):
    """An adapter that cannot be read or does not fit the model (one line)."""


def projections(config) -> dict[str, tuple[str, int, int]]:
    """transformers' projection (encoder.block.0.layer.0.SelfAttention.q) -> (our Linear, first row, end row)."""
    out = {}
    for ours, parts in checkpoint_names(config).items():
        modules = [p.removesuffix(".weight") for p in parts]
        if modules[0].rsplit(".", 1)[-1] not in PROJECTIONS:
            continue  # embeddings, norms, position biases, the output layer
        size = config.d_ff if ours.endswith("ffn.wi.weight") else None
        for i, module in enumerate(modules):
            n = size or (config.d_model if module.endswith((".o", ".wo")) else config.inner_dim)
            out[module] = (ours.removesuffix(".weight"), i * n, (i + 1) * n)
    return out


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches the
    end of the module's name, as a regular expression, after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def dropout(x, p: float):
    """F.dropout(x, p) with the drop probability rounded to 1/65536 (0.05 -> 0.0500031): an element is dropped when
    its 16 random bits fall below round(p * 65536), the others are scaled by the inverse of that rounded keep
    probability. float32 on CPU: kernels.seeded_dropout, whose mask is a function of one seed drawn from torch's
    generator, drawn, applied and regenerated in the backward in one pass each (0.33 against F.dropout's ~1.7 ms forward
    for an (8, 128, 512) input; the draw was most of a LoRA layer's own cost). Elsewhere, the bits come from torch's
    generator, four elements to a 64-bit draw."""
    if not p:
        return x
    n, dropped = x.numel(), round(p * 65536)
    if x.dtype == torch.float32 and x.device.type == "cpu" and kernels.available():
        seed = torch.empty((), dtype=torch.int64).random_(-2**63, 2**63 - 1).item()
        return torch.ops.nanoflant5_cpu.seeded_dropout(x, dropped, seed)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768  # (x's shape) bool
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


class LoRALinear(nn.Linear):
    """A frozen Linear (the same weight Parameter) plus one (A, B) pair per adapted block of output rows:
    y = W x + [s_i B_i A_i dropout(x)]_i, computed as one matmul with the stacked A's and one with the block-diagonal
    B's (zero blocks where a fused part has no adapter). The pairs of one fused Linear share its dropout mask (peft
    draws one per projection: the same distribution for each pair, one random draw instead of two or three)."""

    def __init__(self, base: nn.Linear, parts: list[tuple[str, int, int, int, float]], dropout: float):
        """parts: (name, first row, end row, r, scaling) for every block of rows, adapted (r > 0) or not (r = 0)."""
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.parts, self.dropout = parts, dropout
        # float32 adapters on a bfloat16/float16 model (as peft's autocast_adapter_dtype), float64 on a float64 one
        kw = dict(dtype=torch.promote_types(base.weight.dtype, torch.float32), device=base.weight.device)
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, **kw))
                                        for n, _, _, r, _ in parts if r})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(end - start, r, **kw))
                                        for n, start, end, r, _ in parts if r})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as peft initialises A

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = F.linear(x2, self.weight)  # (N, out), a tensor of its own: the update is added in place, in one call
        a = torch.cat([self.lora_A[n] for n, _, _, r, _ in self.parts if r])  # (ParameterDict sorts its keys)
        h = F.linear(dropout(x2, self.dropout) if self.training else x2, a.to(x.dtype))  # (N, sum of r)
        blocks = [self.lora_B[n] * s if r else self.weight.new_zeros(end - start, 0, dtype=h.dtype)
                  for n, start, end, r, s in self.parts]
        return y.addmm_(h, torch.block_diag(*blocks).to(h.dtype).t()).view(*x.shape[:-1], self.out_features)

    def delta(self) -> torch.Tensor:
        """The update of the whole weight, s_i B_i A_i in each adapted block of rows, in float64."""
        d = torch.zeros(self.weight.shape, dtype=torch.float64, device=self.weight.device)
        for n, start, end, r, s in self.parts:
            if r:
                d[start:end] = s * (self.lora_B[n].double() @ self.lora_A[n].double())
        return d


def parse_targets(text: str, config) -> list[str]:
    """--lora-targets: comma-separated projection names, or all-linear (every projection, as peft's all-linear)."""
    present = {m.rsplit(".", 1)[-1] for m in projections(config)}
    if text == "all-linear":
        return sorted(present)
    names = [t.strip() for t in text.split(",") if t.strip()]
    wrong = [t for t in names if t not in present]
    if wrong or not names:
        raise ValueError(f"--lora-targets: {', '.join(wrong) or 'none given'}: this model's projections are "
                         f"{', '.join(sorted(present))} (or all-linear)")
    return sorted(set(names))


def add_adapters(model, targets: list[str], r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
    """Freeze the model and give every projection named in `targets` a fresh LoRA pair (A random, B zero), in
    place: the model computes what it did before, and only the pairs train."""
    model.requires_grad_(False)
    s = scaling(alpha, r, rslora)
    by_linear: dict[str, list] = {}
    for module, (linear, start, end) in projections(model.config).items():
        name = module.rsplit(".", 1)[-1]
        by_linear.setdefault(linear, []).append((name, start, end, r if name in targets else 0, s))
    for linear, parts in by_linear.items():
        if any(p[3] for p in parts):
            _replace(model, linear, LoRALinear(model.get_submodule(linear), parts, dropout))
    return model


def _replace(model, path: str, module: nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def adapted(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """peft's keys -> the adapters' weights (float32, on the CPU)."""
    hf = {(linear, start): module for module, (linear, start, _) in projections(model.config).items()}
    out = {}
    for path, m in adapted(model).items():
        for n, start, _, r, _ in m.parts:
            if r:
                for which, p in (("lora_A", m.lora_A[n]), ("lora_B", m.lora_B[n])):
                    out[f"{PREFIX}{hf[path, start]}.{which}.weight"] = p.detach().float().cpu().contiguous()
    return out


def save_adapter(model, folder, targets: list[str], r: int, alpha: float, dropout: float, rslora: bool,
                 base_model: str | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors as peft's save_pretrained writes them (peft 0.21's fields),
    so that peft.PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base), folder) loads them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_bias": False,
        "lora_dropout": dropout, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": r,
        "rank_pattern": {}, "revision": None, "target_modules": sorted(targets), "target_parameters": None,
        "task_type": "SEQ_2_SEQ_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": rslora, "velora_config": None}
    tensors = adapter_tensors(model)
    write_atomically(folder / "adapter_model.safetensors",
                     lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomically(folder / "adapter_config.json",
                     lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return folder


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight (W + s B A, summed in float64, cast to the weight's dtype) and put the
    plain Linear back: the model is the fine-tuned one, at full speed."""
    for path, m in adapted(model).items():
        weight = nn.Parameter((m.weight.double() + m.delta()).to(m.weight.dtype), requires_grad=False)
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        plain.weight = weight
        _replace(model, path, plain)
    return model


# ---------------------------------------------------------------------------------------------------- reading

# adapter_config.json settings that change what an adapter computes beyond plain LoRA on linear layers
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias vectors (lora_bias)",
               "modules_to_save": "full copies of modules (modules_to_save)",
               "trainable_token_indices": "trainable tokens (trainable_token_indices)",
               "layer_replication": "layer replication", "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
               "target_parameters": "adapters on parameters (target_parameters)", "fan_in_fan_out": "fan_in_fan_out"}


def read_adapter(folder, config) -> dict[str, tuple[int, int, int, torch.Tensor]]:
    """A peft LoRA adapter (folder or hub id), checked against the model's config: our weight's name -> [(first row,
    end row, the update s B A of those rows, in float64)]. load.load_model adds them to the weights as it reads them."""
    folder = resolve(folder, ["adapter_config.json", "adapter_model.safetensors"])  # a local folder or a hub id
    if not (folder / "adapter_config.json").exists():
        raise AdapterError(f"{folder}: no adapter_config.json (not a peft adapter folder?)")
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{folder}: peft_type {settings.get('peft_type')!r} is not supported (only LORA)")
    if settings.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: bias={settings['bias']!r} is not supported (T5 has no biases; only 'none')")
    for key, what in UNSUPPORTED.items():
        if settings.get(key):
            raise AdapterError(f"{folder}: {what} is not supported, only plain LoRA")
    if not (folder / "adapter_model.safetensors").exists():
        raise AdapterError(f"{folder}: no adapter_model.safetensors")
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    known = projections(config)
    pairs: dict[str, dict] = {}
    for key in f.entries:
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if "lora_embedding" in key:
            raise AdapterError(f"{folder}: embedding adapters are not supported ({key})")
        if not match or match[1] not in known:
            raise AdapterError(f"{folder}: unknown tensor {key} (not a LoRA weight of this model's projections)")
        pairs.setdefault(match[1], {})[match[2]] = key
    r0, alpha0, rslora = settings["r"], settings["lora_alpha"], settings.get("use_rslora", False)
    updates: dict[str, list] = {}
    for module, keys in pairs.items():
        if len(keys) != 2:
            raise AdapterError(f"{folder}: {module} has {', '.join(keys)} but not both lora_A and lora_B")
        linear, start, end = known[module]
        r = pattern_value(settings.get("rank_pattern") or {}, module, r0)
        alpha = pattern_value(settings.get("alpha_pattern") or {}, module, alpha0)
        in_features = config.d_ff if module.endswith(".wo") else config.inner_dim if module.endswith(".o") \
            else config.d_model
        for which, want in (("lora_A", (r, in_features)), ("lora_B", (end - start, r))):
            if f.shape(keys[which]) != want:
                raise AdapterError(f"{folder}: {keys[which]} has shape {list(f.shape(keys[which]))}, this model and "
                                   f"r={r} need {list(want)}")
        a, b = (torch.empty(f.shape(keys[w]), dtype=torch.float64) for w in ("lora_A", "lora_B"))
        f.read_into(keys["lora_A"], a)
        f.read_into(keys["lora_B"], b)
        updates.setdefault(linear + ".weight", []).append((start, end, scaling(alpha, r, rslora) * (b @ a)))
    return updates
