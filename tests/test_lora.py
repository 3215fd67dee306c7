"""LoRA: adapters written by us load in peft with the same logits, and peft's load in nanoflant5 (rank_pattern,
alpha_pattern, rsLoRA); merging changes nothing; training matches peft's loss curve in float64, resumes exactly, runs
under torchrun, learns the toy task and leaves the base checkpoint untouched; unsupported adapters fail in one line."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_with_tokenizer, random_batch, random_labels, reference
from nanoflant5 import T5, Tokenizer, lora
from nanoflant5.train import TrainArgs, loss_sum, make_optimizer
from test_cli import run
from test_train import COMMON, reverse_data, run_train, torchrun

peft = pytest.importorskip("peft")


def randomize_B(model, seed=0, std=0.3):
    """LoRA starts with B = 0 (no change): a random B makes the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapted(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * std)
    return model


def peft_model(folder, adapter=None, dtype=torch.float64, **config):
    """transformers' model of `folder` with peft's LoRA: loaded from `adapter`, or fresh from LoraConfig(**config)."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    base = reference(folder).to(dtype)
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter).eval()
    return get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **config))


def logits_pair(ours, theirs, vocab=96, seed=2):
    ids, mask = random_batch(vocab, [7, 3, 12], seed=seed)
    dec = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours(ids, mask, dec), theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def sha256(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(folder).iterdir()) if f.is_file()}


@pytest.mark.parametrize("name, targets", [("gated-gelu-untied", "all-linear"), ("relu-tied", "q,k,wi,wo"),
                                           ("inner-dim", "v,o,wi_1")])
def test_ours_load_in_peft_with_the_same_logits(tmp_path, checkpoint, name, targets):
    folder, _ = checkpoint(name)
    model = T5.from_pretrained(folder, dtype=torch.float64)  # (float32's rounding differs between CPUs' GEMMs)
    names = lora.parse_targets(targets, model.config)
    randomize_B(lora.add_adapters(model, names, r=4, alpha=12, rslora=name == "inner-dim").eval())
    with torch.no_grad():  # the adapters as the file holds them (float32)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(p.float())
    lora.save_adapter(model, tmp_path / "adapter", names, 4, 12, 0.0, name == "inner-dim", str(folder))
    theirs = peft_model(folder, tmp_path / "adapter", torch.float64)
    ours, want = logits_pair(model, theirs)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-10)
    plain = logits_pair(T5.from_pretrained(folder, dtype=torch.float64), theirs)[0]
    assert (plain - want).abs().max() > 0.1  # the adapters matter
    # no missing or unexpected keys: everything peft holds is what we wrote
    saved = {k.replace(".default", "") for k in theirs.state_dict() if "lora_" in k}
    assert saved == set(lora.adapter_tensors(model))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapters_load_in_nanoflant5(tmp_path, checkpoint, rslora):
    """peft writes an adapter on every projection with rank and alpha patterns; T5.from_pretrained(adapter=) merges
    it: the logits of peft's unmerged model in float64, and close to them in float32 and bfloat16."""
    folder, _ = checkpoint("gated-gelu-untied")
    theirs = peft_model(folder, r=4, lora_alpha=8, target_modules="all-linear", use_rslora=rslora,
                        rank_pattern={"decoder.block.1.layer.0.SelfAttention.q": 2, "wi_1": 6},
                        alpha_pattern={"wo": 3, r"encoder\.block\.0\..*\.k": 20}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    theirs.save_pretrained(tmp_path / "adapter")
    ours, want = logits_pair(T5.from_pretrained(folder, dtype=torch.float64, adapter=tmp_path / "adapter"), theirs)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-10)
    f32 = logits_pair(T5.from_pretrained(folder, adapter=tmp_path / "adapter"), theirs)[0]
    torch.testing.assert_close(f32.double(), want, rtol=0, atol=1e-4)
    # a wrong rank or alpha pattern would move the logits by far more than that
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    settings["alpha_pattern"] = {}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
    assert (logits_pair(T5.from_pretrained(folder, dtype=torch.float64, adapter=tmp_path / "adapter"), theirs)[0]
            - want).abs().max() > 1e-2


def test_merged_equals_unmerged(checkpoint):
    folder, _ = checkpoint("unequal-depth")
    model = T5.from_pretrained(folder, dtype=torch.float64)
    randomize_B(lora.add_adapters(model, ["k", "o", "wi_0", "wo"], r=3, alpha=5, dropout=0.3).eval())
    unmerged = logits_pair(model, reference(folder))[0]
    merged = lora.merge(model)
    assert not lora.adapted(merged) and not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits_pair(merged, reference(folder))[0], unmerged, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_is_dropout(dtype):
    """lora.dropout (float32: kernels.seeded_dropout; float64: torch's generator) drops each element with probability
    p (rounded to 1/65536), scales the rest, draws every element alike (each of the four that share a 64-bit word,
    odd sizes), follows torch.manual_seed, and its gradient is the same mask."""
    p = round(0.3 * 65536) / 65536
    kept = lora.dropout(torch.ones(400_003, dtype=dtype), 0.3)
    assert kept.dtype == dtype and kept.unique().tolist() == [0.0, torch.tensor(1 / (1 - p), dtype=dtype).item()]
    for lane in range(4):  # 4 standard errors
        assert abs((kept[lane::4] == 0).double().mean().item() - p) < 4 * (p * (1 - p) / 100_000) ** 0.5
    assert lora.dropout(torch.ones(3, dtype=dtype), 0.0).tolist() == [1.0, 1.0, 1.0]
    torch.manual_seed(5)
    x = torch.randn(2, 5, 7, dtype=dtype, requires_grad=True)
    y = lora.dropout(x, 0.5)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).to(dtype) / (1 - 0.5), rtol=0, atol=0)
    torch.manual_seed(5)
    assert torch.equal(lora.dropout(torch.randn(2, 5, 7, dtype=dtype), 0.5), y.detach())
    assert not torch.equal(lora.dropout(x.detach(), 0.5), y.detach())  # a new draw each call


def test_training_matches_peft_in_float64(checkpoint):
    """Five AdamW steps from the same A and B: the same losses as transformers + peft (LoRA on q, v, wi_0, wo)."""
    folder, _ = checkpoint("gated-gelu-untied")
    targets = ["q", "v", "wi_0", "wo"]
    ours = lora.add_adapters(T5.from_pretrained(folder, dtype=torch.float64).train(), targets, r=4, alpha=16)
    theirs = peft_model(folder, r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0).train()
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(theirs, {k: v.double() for k, v in lora.adapter_tensors(ours).items()})
    assert not result.unexpected_keys
    args = TrainArgs(model="", data="", output="", lr=1e-2)
    opt_ours = make_optimizer(ours, args)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    # (6 attentions x q, v + 4 feed-forwards x wi_0, wo) x (A, B)
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_theirs.param_groups[0]["params"]) == (12 + 8) * 2
    ids, mask = random_batch(96, [7, 3, 12, 5], seed=3)
    labels = random_labels(96, [4, 6, 2, 6], seed=3)
    losses = []
    for _ in range(5):
        loss = loss_sum(ours, ids, mask, labels, torch.autocast("cpu", enabled=False)) / (labels != -100).sum()
        ref = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
        for opt, value in ((opt_ours, loss), (opt_theirs, ref)):
            value.backward()
            opt.step()
            opt.zero_grad()
        losses.append((loss.item(), ref.item()))
    # not to the last bit: both take the norms' mean square in float32 (transformers' T5LayerNorm too), and Adam's
    # first steps magnify the last bits of near-zero gradients (measured: 8e-8 relative at step 5; a wrong scaling,
    # initialisation or gradient moves step 2 by more than 1e-3)
    torch.testing.assert_close(*map(torch.tensor, zip(*losses)), rtol=1e-6, atol=0)
    assert losses[-1][0] < losses[0][0] - 0.1  # it moved


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random model with the real vocabulary and tokenizer: train, generate and serve read it."""
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("lora-base"), seed=5)


LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q,v,wi_1", "--lr", "1e-2", "--seed", "1"]


def test_resume_equals_uninterrupted_and_base_untouched(tmp_path, base_dir):
    """A LoRA run resumed from its step-2 checkpoint (the later ones gone, as after kill -9) ends with the adapters
    of the uninterrupted run; checkpoints hold the adapters and optimizer only; the base files are not touched;
    --merge writes the model the adapter gives; adapter_config.json has peft's fields."""
    before = sha256(base_dir)
    data = reverse_data(tmp_path / "d.jsonl", 64)
    args = ["--model", base_dir, "--data", data, *LORA, "--max-steps", "4", "--save-every", "2", "--batch-size", "8",
            "--dropout", "0.1", "--lora-dropout", "0.1", "--merge"]
    run_train(*args, "--output", tmp_path / "straight")
    out = tmp_path / "resumed"
    run_train(*args, "--output", out)
    for name in ("step-0000004.pt", "../adapter_model.safetensors", "../adapter_config.json"):
        (out / "checkpoints" / name).unlink()
    run_train(*args, "--output", out, "--resume")
    from safetensors.torch import load_file

    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == (6 * 2 + 4) * 2  # (6 attentions x q, v + 4 feed-forwards x wi_1) x (A, B)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    state = torch.load(out / "checkpoints" / "step-0000004.pt", weights_only=False)
    assert {n.split(".")[-2] for n in state["model"]} == {"lora_A", "lora_B"}

    settings = json.loads((out / "adapter_config.json").read_text())
    theirs = peft_model(base_dir, r=4, lora_alpha=8, target_modules=["q", "v", "wi_1"], lora_dropout=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    peft_settings = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(settings) == set(peft_settings) - {"peft_version"}
    differ = {k for k in settings if settings[k] != peft_settings[k]}
    assert differ <= {"target_modules"} and set(settings["target_modules"]) == set(peft_settings["target_modules"])

    merged = T5.from_pretrained(out / "merged", dtype=torch.float64)
    adapted = T5.from_pretrained(base_dir, dtype=torch.float64, adapter=out)
    for (n, p), q in zip(merged.named_parameters(), adapted.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)  # the merged file is float32
    assert sha256(base_dir) == before  # training, merging and loading with the adapter left the base as it was


def test_two_processes_equal_one(tmp_path, base_dir):
    """LoRA under torchrun (DDP over gloo): 2 processes x 4 give the adapters of 1 x 8."""
    data = reverse_data(tmp_path / "d.jsonl", 32)
    args = ["--model", base_dir, "--data", data, *LORA, "--max-steps", "2", "--dropout", "0"]
    run_train(*args, "--output", tmp_path / "one", "--batch-size", "8")
    torchrun(*args, "--output", tmp_path / "two", "--batch-size", "4")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    # within 1% of one Adam step (lr 1e-2): an entry whose gradient is near Adam's eps (1e-8) moves by lr g / (|g| +
    # eps), which the gradient's float32 rounding (summed over 8 rows, or 4 + 4 through the all-reduce) moves too: an
    # AMD EPYC gave 1.8e-5 for one of 128 entries; a process that skipped the all-reduce would be off by ~lr
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    r = run_train(*args, "--output", tmp_path / "fsdp", "--fsdp", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "drop --fsdp" in r.stderr


def test_toy_task_learns_with_lora(tmp_path):
    """examples/tiny-t5 (random, frozen) with LoRA on every projection: the loss on held-out lists falls to under
    half of where it starts (adapters that did not train, or trained the wrong way, stay near 10.7)."""
    data, held_out = reverse_data(tmp_path / "d.jsonl", 960), reverse_data(tmp_path / "e.jsonl", 48, seed=1)
    out = tmp_path / "run"
    run_train(*COMMON[:-4], "--data", data, "--eval-data", held_out, "--output", out, "--max-steps", "60",
              "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "10", "--lora-r", "16", "--lora-alpha", "32",
              "--lora-targets", "all-linear")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval_loss"] < 0.5 * metrics[0]["loss"], metrics


@pytest.fixture
def adapter(tmp_path, checkpoint):
    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder)
    lora.add_adapters(model, ["q", "wo"], r=2, alpha=4)
    return folder, lora.save_adapter(model, tmp_path / "adapter", ["q", "wo"], 2, 4, 0.0, False)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def edit_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda f: edit_config(f, use_dora=True), "DoRA"),
    (lambda f: edit_config(f, peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (lambda f: edit_config(f, bias="lora_only"), "bias='lora_only' is not supported"),
    (lambda f: edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda f: edit_tensors(f, lambda t: t.update({"base_model.model.shared.lora_embedding_A": torch.zeros(2, 96)})),
     "embedding adapters are not supported"),
    (lambda f: edit_tensors(f, lambda t: t.update({
        "base_model.model.encoder.block.9.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 32)})),
     r"unknown tensor base_model\.model\.encoder\.block\.9\."),
    (lambda f: edit_tensors(f, lambda t: t.pop("base_model.model.decoder.block.0.layer.2.DenseReluDense.wo.lora_B"
                                               ".weight")),
     "wo has lora_A but not both"),
    (lambda f: edit_config(f, r=3), r"lora_A.weight has shape \[2, 32\], this model and r=3 need \[3, 32\]"),
    (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
])
def test_unsupported_adapters_fail_in_one_line(adapter, edit, message):
    folder, path = adapter
    edit(path)
    with pytest.raises(lora.AdapterError, match=message):
        T5.from_pretrained(folder, adapter=path)


def strong_adapter(base_dir, folder):
    """An adapter on base_dir with a random B large enough to change the generated text."""
    model = T5.from_pretrained(base_dir)
    randomize_B(lora.add_adapters(model, ["q", "v", "wi_0", "wo"], r=4, alpha=8), std=2.0)
    return lora.save_adapter(model, folder, ["q", "v", "wi_0", "wo"], 4, 8, 0.0, False)


def test_cli_adapter_prints_what_the_api_generates(tmp_path, base_dir):
    strong_adapter(base_dir, tmp_path / "adapter")
    prompts = ["How do I make pesto sauce?", "Translate to German: The house is wonderful.", "reverse: red cat"]
    r = run("generate", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "10",
            *[a for p in prompts for a in ("--prompt", p)])
    assert r.returncode == 0, r.stderr
    api, tok = T5.from_pretrained(base_dir, adapter=tmp_path / "adapter"), Tokenizer.from_pretrained(base_dir)
    ids, mask = tok.encode(prompts)
    want = tok.batch_decode(api.generate(ids, mask, max_new_tokens=10))
    assert r.stdout.splitlines() == want
    plain = tok.batch_decode(T5.from_pretrained(base_dir).generate(ids, mask, max_new_tokens=10))
    assert plain != want  # the adapter changes the text

    edit_config(tmp_path / "adapter", use_dora=True)
    r = run("generate", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "DoRA (use_dora) is not supported" in r.stderr
    r = run("generate", "--model", str(tmp_path / "adapter"), "--prompt", "hi")  # the adapter as the model
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "a LoRA adapter, not a model" in r.stderr


def test_serve_adapter_answers_what_the_api_generates(tmp_path, base_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import Running

    adapter = strong_adapter(base_dir, tmp_path / "adapter")
    prompt = "Translate to German: The house is wonderful."
    server = Running(base_dir, "--adapter", str(adapter))  # float64
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "t5", "prompt": prompt, "max_tokens": 10, "temperature": 0})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    tok = Tokenizer.from_pretrained(base_dir)
    ids, mask = tok.encode([prompt])
    api = T5.from_pretrained(base_dir, dtype=torch.float64, adapter=adapter)
    assert r.json()["choices"][0]["text"] == tok.batch_decode(api.generate(ids, mask, max_new_tokens=10))[0]
