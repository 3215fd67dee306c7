"""Fine-tuning: one readable training loop, in the spirit of nanoGPT's train.py.

    nanoflant5 train --model google/flan-t5-base --data train.jsonl --output runs/mine --max-steps 1000
    nanoflant5 train ... --lora-r 16 --lora-alpha 32 --lora-targets q,v     # LoRA adapters, in peft's layout
    torchrun --nproc_per_node=4 -m nanoflant5 train ...          # data-parallel (DDP; --fsdp shards the model)

Data: JSONL with input/target fields (or Dolly's instruction/context/response, or prompt/answer), or TSV (input,
target). The global batch is batch_size x processes x grad_accum examples; the loss is the mean cross-entropy over
all target tokens of the global batch (transformers' loss for one batch), so the number of processes does not
change the result. Checkpoints are written atomically and hold everything needed to resume exactly: model,
optimizer, schedule, random states; the data order is a function of the seed and the step. The final model is
exported in the Hugging Face layout; with LoRA (lora.py) the base is frozen, checkpoints hold the adapters and the
optimizer, and the adapters are exported in peft's layout (--merge: also the merged model, in DIR/merged).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import lora, speed
from .config import T5Config
from .load import resolve, save_pretrained, write_atomically
from .model import T5
from .tokenizer import TOKENIZER_FILES, Tokenizer


@dataclass
class TrainArgs:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    max_steps: int | None = None
    epochs: float | None = None  # used when max_steps is not given (default 1 epoch)
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    optimizer: str = "adamw"  # adamw | adafactor
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    max_input_length: int = 512
    max_target_length: int = 128
    dropout: float | None = None  # overrides the checkpoint's dropout_rate
    dtype: str = "float32"  # bfloat16: autocast with float32 master weights
    grad_checkpointing: bool = False
    eval_every: int = 0  # 0: only at the end (when eval data is given)
    save_every: int = 0  # 0: only at the end
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    input_field: str | None = None
    target_field: str | None = None
    from_scratch: bool = False  # random weights for the model's config.json
    tokenizer: str | None = None  # default: the model's own
    fsdp: bool = False
    keep_checkpoints: int = 2
    lora_r: int = 0  # LoRA rank; 0: full fine-tuning
    lora_alpha: float = 8.0  # the update is scaled by alpha / r (peft's defaults: r 8, alpha 8, targets q,v)
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"  # transformers' projection names (q,k,v,o,wi_0,wi_1,wo; wi) or all-linear
    lora_rslora: bool = False  # scale by alpha / sqrt(r)
    merge: bool = False  # LoRA: also export the merged model to DIR/merged


class DataError(ValueError):
    """A problem in a data file, reported as FILE:LINE: what."""


# ------------------------------------------------------------------------------------------------------ data

KNOWN_FIELDS = [("input", "target"), ("prompt", "answer"), ("prompt", "completion"), ("source", "target")]


def read_examples(path, input_field=None, target_field=None) -> list[tuple[str, str]]:
    """(input, target) pairs from a .tsv (two first columns) or JSONL file, checked line by line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from e
    examples = []
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
        if not text.strip():
            continue
        if path.suffix == ".tsv":
            cols = text.split("\t")
            if number == 1 and [c.strip().lower() for c in cols[:2]] == ["input", "target"]:
                continue  # a header
            if len(cols) < 2:
                raise DataError(f"{where}: expected input<TAB>target, found {len(cols)} column(s)")
            source, target = cols[0], cols[1]
        else:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            source, target = example_fields(row, input_field, target_field, where)
        if not target.strip():
            raise DataError(f"{where}: empty target")
        examples.append((source, target))
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


def example_fields(row: dict, input_field, target_field, where):
    if input_field or target_field:
        names = (input_field or "input", target_field or "target")
    elif "instruction" in row and "response" in row:  # Dolly
        context = row.get("context") or ""
        return row["instruction"] + (f"\n\n{context}" if context.strip() else ""), str(row["response"])
    else:
        names = next((pair for pair in KNOWN_FIELDS if pair[0] in row and pair[1] in row), ("input", "target"))
    for name in names:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(row) or 'none'}; "
                            "use --input-field/--target-field)")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} is not a string")
    return row[names[0]], row[names[1]]


def tokenize(examples, tokenizer: Tokenizer, max_input: int, max_target: int):
    """(input ids, target ids) per example, each ending with </s>, truncated to the length limits."""
    return list(zip(tokenizer.encode_rows([e[0] for e in examples], max_input),
                    tokenizer.encode_rows([e[1] for e in examples], max_target)))


def collate(pairs, pad: int):
    """Right-padded input ids, attention mask, and labels with -100 where there is no target token."""
    S, T = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
    ids = torch.full((len(pairs), S), pad, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for i, (src, tgt) in enumerate(pairs):
        ids[i, :len(src)] = torch.tensor(src)
        labels[i, :len(tgt)] = torch.tensor(tgt)
    return ids, (ids != pad).long(), labels


def global_batch(n: int, step: int, size: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a stream of epochs, each a seeded permutation of the data."""
    out, pos = [], step * size
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = order[offset:offset + size - len(out)].tolist()
        out += take
        pos += len(take)
    return out


# ------------------------------------------------------------------------------------------------------ pieces


def lr_factor(step: int, args: TrainArgs, total: int) -> float:
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    if args.schedule == "linear":
        return max(0.0, 1.0 - progress)
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(model, args: TrainArgs):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adafactor":  # T5's own optimizer (Shazeer & Stern 2018)
        return torch.optim.Adafactor(params, lr=args.lr, weight_decay=args.weight_decay)
    # fused: one kernel updates every parameter; torch's CPU default is a Python loop over the tensors, which takes
    # 4x longer (flan-t5-small here: 231 -> 52 ms a step, a quarter of the whole step; benchmarks/train_bench.py)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def loss_sum(model, ids, mask, labels, autocast):
    """Sum of the token cross-entropies (in float32, or the model's dtype if wider)."""
    with autocast:
        logits = model(ids, mask, labels=labels)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    return speed.cross_entropy_sum(logits, labels)


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").glob("step-*.pt"))


class Progress:
    """One line on stderr, rewritten in place: step, loss, learning rate, tokens/s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()

    def update(self, m: dict):
        if self.enabled:
            done = int(30 * m["step"] / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {m['step']}/{self.total} loss {m['loss']:.4f} "
                  f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ the loop


def train(args: TrainArgs) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    out = Path(args.output)
    check_args(args, out)

    # Everything that can fail on bad input happens before any process group or training starts.
    if args.lora_r:
        lora.parse_targets(args.lora_targets, T5Config.from_json(resolve(args.model, ["config.json"]) / "config.json"))
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    data = tokenize(read_examples(args.data, args.input_field, args.target_field), tokenizer,
                    args.max_input_length, args.max_target_length)
    eval_data = None
    if args.eval_data:
        eval_data = tokenize(read_examples(args.eval_data, args.input_field, args.target_field), tokenizer,
                             args.max_input_length, args.max_target_length)

    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, out, rank, world, device, tokenizer, data, eval_data)
    finally:
        if distributed:
            dist.destroy_process_group()


def check_args(args: TrainArgs, out: Path):
    if args.schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"--schedule must be constant, linear or cosine, got {args.schedule!r}")
    if args.optimizer not in ("adamw", "adafactor"):
        raise ValueError(f"--optimizer must be adamw or adafactor, got {args.optimizer!r}")
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError("--max-steps must be >= 1")
    if args.lora_r < 0 or not 0 <= args.lora_dropout < 1:
        raise ValueError("--lora-r must be >= 1 (or 0: no LoRA) and --lora-dropout in [0, 1)")
    if args.lora_r and args.fsdp:
        raise ValueError("--fsdp shards full fine-tuning; LoRA trains small adapters on a frozen model: drop --fsdp "
                         "(torchrun replicates it with DDP)")
    if args.merge and not args.lora_r:
        raise ValueError("--merge merges LoRA adapters: it needs --lora-r")
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out} exists and is not empty: pass --resume to continue its run, or --overwrite "
                              "to replace it")


def _train(args, out, rank, world, device, tokenizer, data, eval_data) -> int:
    main = rank == 0
    G = args.batch_size * world * args.grad_accum
    total = args.max_steps or max(1, math.ceil((args.epochs or 1.0) * len(data) / G))
    torch.manual_seed(args.seed)
    if args.from_scratch:
        model = T5(T5Config.from_json(resolve(args.model, ["config.json"]) / "config.json")).init_weights()
    else:
        model = T5.from_pretrained(args.model)
    model = model.to(device).train()
    if args.lora_r:  # the same random A's in every process (seeded alike)
        lora.add_adapters(model, lora.parse_targets(args.lora_targets, model.config), args.lora_r, args.lora_alpha,
                          args.lora_dropout, args.lora_rslora)
    torch.manual_seed(args.seed + rank)  # dropout differs between ranks, as it would within one big batch
    if args.dropout is not None:
        model.set_dropout(args.dropout)
    model.set_checkpointing(args.grad_checkpointing)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    ddp = model
    if args.fsdp and world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in [*model.encoder.blocks, *model.decoder.blocks]:
            fully_shard(block)
        fully_shard(model)
    elif world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args, total))

    step = 0
    if args.resume and checkpoints(out):
        step = load_checkpoint(checkpoints(out)[-1], model, optimizer, scheduler, rank, args.fsdp and world > 1,
                               bool(args.lora_r))
        if main:
            print(f"resumed from {checkpoints(out)[-1]} at step {step}", file=sys.stderr)
    elif main:
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    if world > 1:
        dist.barrier()

    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the step, save, exit
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(total, main)
    try:
        with speed.fused_layers(model):  # layer norms and activations in one call (CPU, float32)
            while step < total:
                t0 = time.perf_counter()
                indices = global_batch(len(data), step, G, args.seed)
                n_tokens = sum(len(data[i][1]) for i in indices)  # target tokens in the whole global batch
                n_seen = n_tokens + sum(len(data[i][0]) for i in indices)
                mine = indices[rank::world]  # this process' share, cut into grad_accum micro-batches
                total_loss = torch.zeros((), device=device)
                for micro in range(args.grad_accum):
                    part = mine[micro * args.batch_size:(micro + 1) * args.batch_size]
                    ids, mask, labels = (t.to(device) for t in collate([data[i] for i in part], tokenizer.pad_token_id))
                    sync = micro == args.grad_accum - 1 or ddp is model
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        loss = loss_sum(ddp, ids, mask, labels, autocast)
                        # DDP averages gradients over processes; scaling by world makes the sum over all of them
                        (loss * world / n_tokens).backward()
                    total_loss += loss.detach()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                stopping = torch.tensor([0 if stop["signal"] is None else 1], device=device)
                if world > 1:
                    dist.all_reduce(total_loss)
                    dist.all_reduce(stopping)
                seconds = time.perf_counter() - t0
                metrics = {"step": step, "loss": total_loss.item() / n_tokens, "lr": lr,
                           "tokens_per_s": n_seen / seconds, "time": time.time()}
                if eval_data and ((args.eval_every and step % args.eval_every == 0) or step == total):
                    metrics["eval_loss"] = evaluate(ddp, eval_data, args, rank, world, device, tokenizer, autocast)
                if main:
                    progress.update(metrics)
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                if (args.save_every and step % args.save_every == 0) or stopping.item() or step == total:
                    save_checkpoint(out, step, model, optimizer, scheduler, args, rank, world)
                if stopping.item():
                    progress.close()
                    if main:
                        print(f"stopped by signal at step {step}; checkpoint saved, continue with --resume",
                              file=sys.stderr)
                    return 128 + (stop["signal"] or signal.SIGTERM)
            progress.close()
            export(model, optimizer, out, args, tokenizer, rank, world)
            return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def evaluate(model, data, args, rank, world, device, tokenizer, autocast) -> float:
    """Mean token cross-entropy over the evaluation set (each process takes every world-th batch)."""
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    batches = range(0, len(data), args.batch_size)
    for start in list(batches)[rank::world]:
        ids, mask, labels = (t.to(device) for t in collate(data[start:start + args.batch_size],
                                                           tokenizer.pad_token_id))
        total += loss_sum(model, ids, mask, labels, autocast)
        tokens += (labels != -100).sum()
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(tokens)
    model.train(was_training)
    return (total / tokens).item()


def full_state(model, optimizer, sharded: bool):
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out: Path, step, model, optimizer, scheduler, args, rank, world):
    sharded = args.fsdp and world > 1
    model_state, optim_state = full_state(model, optimizer, sharded)  # collective under FSDP
    if args.lora_r:  # the adapters: the base is --model's, unchanged
        model_state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rng = torch.get_rng_state()
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if rank == 0:
        state = {"step": step, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "rng": rngs, "args": asdict(args)}
        # a checkpoint is either complete or absent
        write_atomically(out / "checkpoints" / f"step-{step:07d}.pt", lambda p: torch.save(state, p))
        for old in checkpoints(out)[:-args.keep_checkpoints]:
            old.unlink()
    if world > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int, sharded: bool, adapters: bool = False) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    for saved, group in zip(state["optimizer"]["param_groups"], optimizer.param_groups):
        saved.update({k: group[k] for k in ("fused", "foreach") if k in group})  # this run's kernel choice
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        if adapters and set(state["model"]) != {n for n, p in model.named_parameters() if p.requires_grad}:
            raise ValueError(f"{path}: its LoRA adapters do not match this run's --lora-* settings")
        model.load_state_dict(state["model"], strict=not adapters)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"][rank])
    return state["step"]


def export(model: T5, optimizer, out: Path, args: TrainArgs, tokenizer: Tokenizer, rank: int, world: int):
    """The final model in DIR, in the Hugging Face layout (LoRA: the adapters in peft's layout, and with --merge the
    merged model in DIR/merged), with the tokenizer files next to it (rank 0 writes)."""
    if args.fsdp and world > 1:  # gather the shards into a plain model on rank 0
        state = full_state(model, optimizer, sharded=True)[0]
        if rank == 0:
            plain = T5(model.config)
            plain.load_state_dict(state)
            if model.config.tie_word_embeddings:
                plain.lm_head.weight = plain.shared.weight
            model = plain
    if rank == 0:
        model.eval()
        folders = [out]
        if args.lora_r:
            lora.save_adapter(model, out, lora.parse_targets(args.lora_targets, model.config), args.lora_r,
                              args.lora_alpha, args.lora_dropout, args.lora_rslora, str(args.model))
            if args.merge:
                folders.append(save_pretrained(lora.merge(model), out / "merged"))
        else:
            save_pretrained(model, out)
        source = resolve(args.tokenizer or args.model, TOKENIZER_FILES)
        for name in TOKENIZER_FILES:
            for folder in folders:
                if (source / name).exists():
                    shutil.copy(source / name, folder / name)
    if world > 1:
        dist.barrier()
