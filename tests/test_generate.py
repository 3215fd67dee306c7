"""Generation against transformers' generate(do_sample=False), token for token, over padded batches."""

import itertools

import pytest
import torch

import nanoflant5.speed as S
from helpers import CONFIGS, make_checkpoint, random_batch
from nanoflant5 import kernels
from nanoflant5.load import load_model

LENGTHS = [7, 3, 12, 5, 20, 9]


def hf_generate(ref, ids, mask, **kw):
    with torch.no_grad():
        return ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)


def beam_grid():
    for nb, lp, es, nrs, mn in itertools.product([2, 4], [1.0, 0.0, 2.0, -1.0], [False, True, "never"], [1, 2],
                                                 [0, 5]):
        if nrs <= nb:
            yield dict(num_beams=nb, length_penalty=lp, early_stopping=es, num_return_sequences=nrs,
                       min_new_tokens=mn)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_transformers(checkpoint, name):
    folder, ref = checkpoint(name)
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=1)
    for kw in [dict(max_new_tokens=24), dict(max_new_tokens=24, min_new_tokens=6), dict(max_new_tokens=1),
               dict(max_new_tokens=40)]:
        want = hf_generate(ref, ids, mask, **kw)
        got = model.generate(ids, mask, **kw)
        assert torch.equal(got, want), kw



def test_generated_rows_and_scores_can_enter_autograd(checkpoint):
    """generate() runs in inference mode, but what it returns is plain tensors: feeding its rows back to the model
    with gradients on (as the README's example and training on generated targets do) works, and gives the logits
    generation chose its tokens from."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS[:2], seed=1)
    rows, scores = model.generate(ids, mask, max_new_tokens=8, return_scores=True)
    assert not rows.is_inference() and not scores.is_inference()
    logits = model(ids, mask, decoder_input_ids=rows)
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None
    chosen = logits[:, :-1].argmax(-1)
    alive = rows[:, 1:] != 0  # padding after </s> was not chosen by the model
    assert torch.equal(chosen[alive], rows[:, 1:][alive])

@pytest.mark.parametrize("name, stride, max_new_tokens, seed", [
    ("gated-gelu-untied", 1, 24, 1), ("relu-tied", 1, 24, 1),  # the whole grid
    ("unequal-depth", 5, 16, 2), ("inner-dim", 5, 16, 2),  # every fifth setting
])
def test_beam_search_matches_transformers(checkpoint, name, stride, max_new_tokens, seed):
    folder, ref = checkpoint(name)
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=seed)
    for kw in list(beam_grid())[::stride]:
        want = hf_generate(ref, ids, mask, max_new_tokens=max_new_tokens, **kw)
        got = model.generate(ids, mask, max_new_tokens=max_new_tokens, **kw)
        assert torch.equal(got, want), kw


def test_blockwise_argmax_and_top_k_equal_torch():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 256), (8, 32128), (3, 4 * 32128)]:
        x = torch.randn(shape, generator=g)
        x[0, 7] = x[0, 200] = x.max() + 1  # a tie: argmax takes the first
        x[-1, ::3] = float("-inf")
        assert torch.equal(S.argmax(x), x.argmax(-1))
        y = x.clone()
        y[-1] = float("-inf")  # a row of -inf: index 0
        y[0, [9, shape[1] - 1]] = float("nan")  # NaN counts as the maximum, as in torch
        assert torch.equal(S.argmax(y), y.argmax(-1))
        for k in (1, 2, 8):
            x[0, 200] += 0.5  # top_k: no ties
            want, got = x.topk(k), S.top_k(x, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x = torch.randn(2, 300, generator=g)  # not a multiple of the block size: torch's own
    assert torch.equal(S.argmax(x), x.argmax(-1)) and torch.equal(S.top_k(x, 3)[1], x.topk(3)[1])


def test_blockwise_search_matches_transformers(checkpoint, monkeypatch):
    """The tiny test vocabulary (96) is below one block of 128, so the other parity tests use torch's argmax and
    topk; with blocks of 8 they take the blockwise path."""
    monkeypatch.setattr(S, "CHUNK", 8)
    folder, ref = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=3)
    for kw in [dict(max_new_tokens=24), dict(max_new_tokens=24, min_new_tokens=6)] + list(beam_grid())[::4]:
        kw = dict(max_new_tokens=20) | kw
        assert torch.equal(model.generate(ids, mask, **kw), hf_generate(ref, ids, mask, **kw)), kw


def test_outputs_are_not_degenerate(checkpoint):
    """Guard for the test checkpoints themselves: outputs use many tokens and end at different lengths."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=1)
    rows = model.generate(ids, mask, max_new_tokens=24)
    lengths = {int((r != 0).sum()) for r in rows}
    assert (rows == 1).any(1).all()  # every row ended with </s> ...
    assert len(lengths) >= 4  # ... at different lengths
    assert len(set(rows.flatten().tolist())) >= 20


def test_cached_equals_uncached(checkpoint):
    """Greedy with the KV cache == greedy that re-runs the whole decoder on the prefix at every step."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=3)
    cached = model.generate(ids, mask, max_new_tokens=20)
    tokens = torch.zeros(len(LENGTHS), 1, dtype=torch.long)
    done = torch.zeros(len(LENGTHS), dtype=torch.bool)
    with torch.no_grad():
        encoded = model.encode(ids, mask)
        for _ in range(20):
            nxt = model.decode(tokens, encoded, mask)[:, -1].float().argmax(-1).masked_fill(done, 0)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == 1
            if done.all():
                break
    assert torch.equal(cached, tokens)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batching_does_not_change_outputs(checkpoint, num_beams):
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=4)
    batched = model.generate(ids, mask, max_new_tokens=20, num_beams=num_beams)
    for i, n in enumerate(LENGTHS):
        alone = model.generate(ids[i:i + 1, :n], max_new_tokens=20, num_beams=num_beams)[0]
        row = batched[i]
        assert torch.equal(row[:len(alone)], alone)
        assert (row[len(alone):] == row[-1]).all()  # only padding after it


def count_packed_calls(monkeypatch):
    """A list that grows by one at each packed GEMM (speed._packed_linear calling a packer's GEMM)."""
    calls = []
    for name, packer in list(S.PACKERS.items()):
        monkeypatch.setitem(S.PACKERS, name, packer._replace(run=lambda *a, run=packer.run: calls.append(1) or run(*a)))
    return calls


def count_packs(monkeypatch):
    """A list of the weights packed (by any packer), in order."""
    packs = []
    for name, packer in list(S.PACKERS.items()):
        monkeypatch.setitem(S.PACKERS, name, packer._replace(pack=lambda w, rows, pack=packer.pack: packs.append(w)
                                                             or pack(w, rows)))
    return packs


FLOAT32_PACKERS = sorted(name for name, p in S.PACKERS.items() if torch.float32 in p.dtypes)  # (not bf16_panels)
PACKERS = FLOAT32_PACKERS or [pytest.param(None, marks=pytest.mark.skip(reason="torch has no packed GEMMs"))]


@pytest.mark.parametrize("packer", PACKERS)
def test_packed_weights_change_no_output(checkpoint, monkeypatch, packer):
    """float32 on CPU: batched and beam decoding run the decoder on prepacked weights (fast_linears; each packer in
    turn). Rows are those of plain F.linear decoding, scores agree to float32 rounding, and the copies are gone
    afterwards."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS, seed=6)
    monkeypatch.setattr(S, "PACKER", packer)
    calls = count_packed_calls(monkeypatch)
    for kw in [dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3, num_return_sequences=2)]:
        calls.clear()
        rows, scores = model.generate(ids, mask, return_scores=True, **kw)
        per_step = 6 * len(model.decoder.blocks) + 1  # every decoding step's linears took the packed path
        assert len(calls) >= per_step * (rows.shape[1] - 1) > 0
        assert not any("forward" in m.__dict__ for m in model.modules()) and not S._PACKED
        monkeypatch.setattr(S, "PACKING", False)
        plain_rows, plain_scores = model.generate(ids, mask, return_scores=True, **kw)
        monkeypatch.setattr(S, "PACKING", True)
        assert torch.equal(rows, plain_rows), kw
        torch.testing.assert_close(scores, plain_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not FLOAT32_PACKERS, reason="torch has no packed GEMMs")
def test_packers_are_chosen_by_measurement(monkeypatch):
    """Which packed GEMM the layers get is measured once per dtype and row count (choose_packer), and the choice is
    one of the packers that take the dtype and can run here (None where none does)."""
    monkeypatch.setattr(S, "_CHOSEN", {})
    monkeypatch.setattr(S, "MEASURE_BYTES", 2 ** 22)
    w = torch.empty(96, 64)
    choice = S.choose_packer(w, 8)
    assert torch.float32 in S.PACKERS[choice].dtypes and S.PACKERS[choice].ready()
    assert S._CHOSEN == {(torch.float32, 8): choice}
    packs = count_packs(monkeypatch)
    assert S.choose_packer(torch.empty(512, 2048), 8) == choice and not packs  # not measured again
    assert S.choose_packer(torch.empty(96, 64, dtype=torch.float16), 8) is None  # no packer takes it: not measured


@pytest.mark.skipif(not FLOAT32_PACKERS, reason="torch has no packed GEMMs")
def test_packed_weights_follow_training_and_autocast(checkpoint, monkeypatch):
    """Weights changed between two calls (a fused AdamW step, which does not bump tensors' version counters) are
    never met by a stale packed copy; under CPU autocast the decoder runs as autocast says."""
    from contextlib import nullcontext

    from nanoflant5.train import TrainArgs, loss_sum, make_optimizer

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS, seed=7)
    monkeypatch.setattr(S, "PACKER", FLOAT32_PACKERS[0])
    kw = dict(max_new_tokens=20, num_beams=2, return_scores=True)
    model.generate(ids, mask, **kw)
    optimizer = make_optimizer(model, TrainArgs(model="", data="", output="", lr=1e-2))
    model.train()
    loss_sum(model, ids, mask, ids, nullcontext()).backward()
    optimizer.step()
    model.eval()
    rows, scores = model.generate(ids, mask, **kw)
    monkeypatch.setattr(S, "PACKING", False)
    plain_rows, plain_scores = model.generate(ids, mask, **kw)
    assert torch.equal(rows, plain_rows)
    torch.testing.assert_close(scores, plain_scores, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.generate(ids, mask, **kw)
        monkeypatch.setattr(S, "PACKING", True)
        assert torch.equal(model.generate(ids, mask, **kw)[0], plain[0])


@pytest.mark.skipif(not FLOAT32_PACKERS, reason="torch has no packed GEMMs")
def test_compiled_decoding_keeps_packed_weights(checkpoint, monkeypatch):
    """compile=True keeps the packed copies between calls: the next call with the same row count packs nothing, a
    weight changed in place (no version counter bump) or replaced is packed again, and so is every weight for a new
    row count or another packer; rows are always those of plain decoding with the current weights. (The step runs
    eagerly here: what is kept does not depend on compiling, which test_compiled_step_matches_eager covers.)"""
    import gc

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS[:2], seed=9)
    monkeypatch.setattr(S, "compiled_step", lambda step, device, on_compiled=None: step)
    monkeypatch.setattr(S, "PACKER", FLOAT32_PACKERS[0])
    packs = count_packs(monkeypatch)
    per_call = 6 * len(model.decoder.blocks) + 1

    def check(want_packs, **kw):
        packs.clear()
        rows = model.generate(ids, mask, compile=True, max_new_tokens=16, num_beams=3, **kw)
        assert len(packs) == want_packs
        monkeypatch.setattr(S, "PACKING", False)
        assert torch.equal(rows, model.generate(ids, mask, max_new_tokens=16, num_beams=3, **kw))
        monkeypatch.setattr(S, "PACKING", True)

    check(per_call)
    check(0)
    assert not S._PACKED and not any("forward" in m.__dict__ for m in model.modules())
    wo = model.decoder.blocks[1].ffn.wo
    with torch.no_grad():
        wo.weight.data[3, 5] += 0.5  # in place, through .data: the version counter stays
    check(1)
    assert packs == [wo.weight]
    wo.weight = torch.nn.Parameter(wo.weight.detach().flip(0))
    check(1)
    check(0, num_return_sequences=2, length_penalty=0.5)  # other settings, the same rows: kept
    if len(FLOAT32_PACKERS) > 1:
        monkeypatch.setattr(S, "PACKER", FLOAT32_PACKERS[1])
        check(per_call)
        monkeypatch.setattr(S, "PACKER", FLOAT32_PACKERS[0])
        check(per_call)
    packs.clear()
    rows5 = model.generate(ids[:1], compile=True, max_new_tokens=16, num_beams=5)  # 5 rows: packed again
    assert len(packs) == per_call
    gc.collect()  # (other tests' models that are garbage already)
    kept = len(S._KEPT)
    assert kept >= per_call
    monkeypatch.setattr(S, "KEEP_BYTES", 0)  # too large to keep: packed each call, nothing more kept
    packs.clear()
    assert torch.equal(model.generate(ids[:1], compile=True, max_new_tokens=16, num_beams=5), rows5)
    assert len(packs) == per_call and len(S._KEPT) == kept
    model = wo = None  # (check() sees the same variable)
    gc.collect()
    assert len(S._KEPT) == kept - per_call  # the copies go with the model


@pytest.mark.parametrize("packer", PACKERS)
def test_kept_packing_takes_strided_weights(packer):
    """A weight that is not contiguous (a transposed view) is packed as it is and not kept (its fingerprint reads
    rows as 8-byte words)."""
    import torch.nn.functional as F

    linear = torch.nn.Linear(64, 32, bias=False)
    linear.weight = torch.nn.Parameter(torch.randn(64, 32).t())
    x = torch.randn(4, 64)
    packed = S.pack(linear, packer, 4, keep=True)
    torch.testing.assert_close(S.PACKERS[packer].run(x, packed, linear.weight, 4), F.linear(x, linear.weight))
    assert linear not in S._KEPT


def test_default_compiles_once_compiling_pays(checkpoint, monkeypatch, tmp_path):
    """compile=None (the default): a model decodes eagerly until its eager decoding in this process has taken as long
    as compiling takes (the guess COMPILE_SECONDS, or the time measured beside the compile cache), then compiled; the
    first compiled call's time is kept for later processes; after a failed compile, eager again; compile=False never
    compiles."""
    monkeypatch.setattr(S, "COMPILE_AUTO", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(S, "MIN_COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(S, "COMPILE_SECONDS", 1e-9)
    monkeypatch.setattr(S, "_EAGER_SECONDS", __import__("weakref").WeakKeyDictionary())
    monkeypatch.setattr(S, "_MEASURED", set())
    monkeypatch.setattr(S, "_COMPILING", __import__("weakref").WeakSet())
    monkeypatch.setattr(S, "_COMPILE_FAILED", set())
    compiles = []

    def fake_compiled_step(step, device, on_compiled=None):  # compiling itself: test_compiled_step_matches_eager
        compiles.append(1)
        on_compiled(12.5)
        return step

    monkeypatch.setattr(S, "compiled_step", fake_compiled_step)
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS[:2], seed=10)
    first = model.generate(ids, mask, max_new_tokens=16)
    assert not compiles and S._EAGER_SECONDS[model] > 0  # nothing spent yet: eager
    assert torch.equal(model.generate(ids, mask, max_new_tokens=16, compile=False), first) and not compiles
    assert torch.equal(model.generate(ids, mask, max_new_tokens=16), first) and compiles == [1]  # now it pays
    model.generate(ids, mask, max_new_tokens=16)
    assert compiles == [1, 1]  # and it stays compiled (the real compiled_step keeps its graphs)
    compiles.clear()
    key = S.compile_key(model, torch.float32)
    assert S.compile_seconds(key) == 12.5  # measured, kept beside the compile cache
    assert (tmp_path / "nanoflant5-compile-seconds.json").exists()
    again = load_model(folder, dtype=torch.float32)  # a new model (as in a later process): 12.5 s to spend first
    again.generate(ids, mask, max_new_tokens=16)
    again.generate(ids, mask, max_new_tokens=16)
    assert compiles == []
    S._EAGER_SECONDS[again] = 13.0
    again.generate(ids, mask, max_new_tokens=16)
    assert compiles == [1]
    third = load_model(folder, dtype=torch.float32)
    S._EAGER_SECONDS[third] = 13.0
    S._COMPILE_FAILED.add("cpu")  # a compile failed in this process: not tried again unasked
    third.generate(ids, mask, max_new_tokens=16)
    assert compiles == [1]


def test_default_stays_eager_where_blocks_run_in_one_call(tmp_path, monkeypatch):
    """compile=None where the eager step runs each decoder block in one kernel call (speed.fast_blocks: float32 on
    CPU, head sizes of multiples of 16): eager however long it has decoded, since the eager step measured as fast as
    the compiled one; once that path no longer applies (a hook on a block), the rule of compile_pays again."""
    from nanoflant5 import kernels

    if not kernels.available():
        pytest.skip("no C++ compiler to build the kernels")
    monkeypatch.setattr(S, "COMPILE_AUTO", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(S, "MIN_COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(S, "COMPILE_SECONDS", 1e-9)
    monkeypatch.setattr(S, "_COMPILING", __import__("weakref").WeakSet())
    compiles = []
    monkeypatch.setattr(S, "compiled_step", lambda step, device, on_compiled=None: compiles.append(1) or step)
    make_checkpoint(tmp_path / "ckpt", "gated-gelu-untied", d_kv=16)
    model = load_model(tmp_path / "ckpt", dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS[:2], seed=10)
    for _ in range(3):
        model.generate(ids, mask, max_new_tokens=16)
    assert not compiles and model in S._BLOCKS_TAKEN
    handle = model.decoder.blocks[0].register_forward_hook(lambda *args: None)
    model.generate(ids, mask, max_new_tokens=16)  # eager, without fast_blocks: now compiling pays
    model.generate(ids, mask, max_new_tokens=16)
    handle.remove()
    assert compiles == [1] and model not in S._BLOCKS_TAKEN


def test_compiled_step_matches_eager(checkpoint, monkeypatch):
    """generate(compile=True) runs the decoding step through torch.compile (one compilation serves every position and
    both calls) and gives the eager rows: greedy on a padded batch, 3 beams (3 rows: not packed, the rows_linear
    kernel where it built), and 3 beams of both inputs (6 rows: the compiled step calls the packed linears)."""
    import warnings

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS[:2], seed=8)
    if FLOAT32_PACKERS:
        monkeypatch.setattr(S, "PACKER", FLOAT32_PACKERS[-1])
    calls = count_packed_calls(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = model.generate(ids, mask, compile=True, max_new_tokens=16)
        beams = model.generate(ids[1:, :LENGTHS[1]], compile=True, max_new_tokens=16, num_beams=3)
        streamed = torch.stack(list(model.stream(ids, mask, compile=True, max_new_tokens=16)), 1)
        assert not calls or not S.kernels.available()
        packed = model.generate(ids, mask, compile=True, max_new_tokens=16, num_beams=3)
        per_step = 6 * len(model.decoder.blocks) + 1
        assert len(calls) >= (packed.shape[1] - 1) * per_step or not FLOAT32_PACKERS
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert torch.equal(compiled, model.generate(ids, mask, max_new_tokens=16))
    assert torch.equal(beams, model.generate(ids[1:, :LENGTHS[1]], max_new_tokens=16, num_beams=3))
    assert torch.equal(streamed, compiled[:, 1:])
    assert torch.equal(packed, model.generate(ids, mask, max_new_tokens=16, num_beams=3))


def test_compiled_generation_matches_transformers(checkpoint):
    """Compiled decoding steps write one query's attention out (matmul, softmax, matmul), fused with beam search's
    gather of each row's history through KVCache.index: in float64 they give transformers' rows, greedy and beams."""
    import warnings

    folder, ref = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kw in [dict(), dict(num_beams=4), dict(num_beams=4, length_penalty=0.0, num_return_sequences=2),
                   dict(num_beams=2, early_stopping=True, min_new_tokens=5)]:
            want = hf_generate(ref, ids, mask, max_new_tokens=20, **kw)
            got = model.generate(ids, mask, compile=True, max_new_tokens=20, **kw)
            assert torch.equal(got, want), kw
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]


def test_compile_failure_falls_back_to_eager(checkpoint, monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS[:2], seed=8)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile failed, decoding eagerly: RuntimeError: no C.. compiler found$"):
        rows = model.generate(ids, mask, compile=True, max_new_tokens=16)
    assert torch.equal(rows, model.generate(ids, mask, max_new_tokens=16))


def test_real_size_flan_t5_small(tmp_path):
    """The published flan-t5-small architecture (random weights): greedy and beam rows equal transformers' (greedy
    through the int8 screen, on AMX tiles where the CPU has them)."""
    import json

    config = json.loads((__import__("pathlib").Path(__file__).parent / "fixtures/flan-t5-small/config.json")
                        .read_text())
    keep = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj")
    overrides = {k: config[k] for k in keep}
    ref = make_checkpoint(tmp_path, "gated-gelu-untied", seed=5, **overrides)
    model = load_model(tmp_path, dtype=torch.float64)
    ids, mask = random_batch(config["vocab_size"], [30, 11, 140], seed=5)
    for kw in [dict(max_new_tokens=24), dict(max_new_tokens=16, num_beams=3, num_return_sequences=2)]:
        assert torch.equal(model.generate(ids, mask, **kw), hf_generate(ref, ids, mask, **kw)), kw
    if S.SCREEN and kernels.available() and kernels.AMX:
        assert S._SCREENS[model.lm_head].kernel == "amx_rows"


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=5, num_beams=0), "num_beams"),
    (dict(max_new_tokens=5, num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(max_new_tokens=5, num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=5, num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=5, do_sample=True, top_p=0.0), "top_p"),
    (dict(max_new_tokens=5, do_sample=True, top_p=1.5), "top_p"),
    (dict(max_new_tokens=5, do_sample=True, temperature=0.0), "temperature"),
    (dict(max_new_tokens=5, do_sample=True, num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(max_new_tokens=5, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(max_new_tokens=5, beam_size=2), "unknown generation argument"),
])
def test_bad_arguments_are_refused(checkpoint, kw, match):
    model = load_model(checkpoint("relu-tied")[0])
    with pytest.raises(ValueError, match=match):
        model.generate(torch.ones(1, 3, dtype=torch.long), **kw)
