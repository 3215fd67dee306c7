"""The low-precision modes: weight-only int8 (quantize.py, kernels.int8_linear, w8a16_linear), w8a8
(kernels.w8a8_linear) and bfloat16 on packed GEMMs. They are not token-equal to float32 (benchmarks/bench.py --modes
measures how close); what is tested here is that each computes exactly what it says: int8 = the model with
per-channel round-to-nearest weights (x in float32: against transformers given the same weights; past FLOAT_ROWS
rows x to 16 bits: against its step-by-step reference); w8a8 = its step-by-step reference (rows quantized, products
summed exactly), row for row whatever the batch; the packed bfloat16 GEMMs = plain bfloat16 decoding."""

import pytest
import torch
import torch.nn.functional as F

import nanoflant5.speed as S
from helpers import random_batch
from nanoflant5 import kernels
from nanoflant5.load import load_model
from nanoflant5 import quantize
from nanoflant5.quantize import Int8Linear, W8A8Linear, w8a8_reference, w8a16_reference

LENGTHS = [7, 3, 12, 5]


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64])
def test_int8_linear_is_the_dequantized_product(rows):
    """int8_linear(x, q, s) = x @ (s q).T to float32 rounding, for any row count (chunks of 4), weights whose row
    count is not a multiple of the 4 read side by side, 3-D and strided inputs."""
    gen = torch.Generator().manual_seed(rows)
    for K, N in [(16, 1), (32, 7), (512, 1153)]:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        s = torch.rand(N, generator=gen) / 100
        x = torch.randn(rows, 1, 2 * K, generator=gen)[..., ::2]  # (rows, 1, K), not contiguous
        y = torch.ops.nanoflant5_cpu.int8_linear(x, q, s)
        assert y.shape == (rows, 1, N) and y.dtype == torch.float32
        w = q.double() * s.double()[:, None]
        exact = F.linear(x.double(), w)
        bound = (K + 2) * 2.0 ** -24 * F.linear(x.double().abs(), w.abs())
        assert ((y.double() - exact).abs() <= 2 * bound + 1e-30).all(), (K, N)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.nanoflant5_cpu.int8_linear(torch.randn(1, 24), torch.zeros(3, 24, dtype=torch.int8), torch.ones(3))


def test_int8_layer_quantizes_per_channel(monkeypatch):
    """Int8Linear holds round(W / s) with s = max|W_row| / 127 (an all-zero row stays zero); up to FLOAT_ROWS rows
    its kernel is the product with the widened weight to rounding, past them it is w8a16_reference's (x to 16 bits)
    where w8a16_linear runs, and F.linear with the widened weight where no kernel takes x."""
    w = torch.randn(40, 32) * torch.rand(40, 1)
    w[5] = 0
    layer = Int8Linear(w)
    s = w.abs().amax(1) / 127
    assert torch.equal(layer.q, torch.round(w / torch.where(s > 0, s, 1)[:, None]).to(torch.int8))
    assert layer.q.abs().amax(1)[torch.arange(40) != 5].eq(127).all() and not layer.q[5].any()
    assert ((layer.dequantized() - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()  # within half a step
    x = torch.randn(quantize.KERNEL_ROWS + 1, 32)
    wide = F.linear(x, layer.dequantized())
    rows = quantize.FLOAT_ROWS
    torch.testing.assert_close(layer(x[:rows]), wide[:rows], rtol=1e-5, atol=1e-5)
    if W8A8_KERNEL:
        assert layer.kernel(rows + 1) == "w8a16_linear"
        assert torch.equal(layer(x[:rows + 1]), w8a16_reference(x[:rows + 1], layer.q, layer.scale))
    monkeypatch.setattr(quantize, "FLOAT_ROWS", 10 ** 9)  # as where torch._int_mm does not sum exactly
    assert layer.kernel(len(x)) is None
    torch.testing.assert_close(layer(x), wide, rtol=0, atol=0)  # more rows than int8_linear takes
    torch.testing.assert_close(layer(x.double()), F.linear(x.double(), layer.dequantized(torch.float64)))


W8A8_KERNEL = kernels.available() and quantize.int_mm_exact(64) and quantize.int_mm_exact(48)


@pytest.mark.skipif(not W8A8_KERNEL, reason="no C++ kernel, or torch._int_mm does not sum exactly here")
@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 512])
def test_w8a8_and_w8a16_linear_are_their_references(rows, digits):
    """w8a8_linear = w8a8_reference and w8a16_linear = w8a16_reference bit for bit: each row quantized with its own
    scale (a zero row, a row of values too small for a normal scale (zeros out), a row with one large entry; a NaN or
    an infinity makes the row NaN) to one or two int8 digits, the int8 products summed exactly
    (int8_rows for up to 8 rows of digits, else oneDNN's GEMM), the scales applied in the same order; 3-D strided
    inputs. Both are within their quantization's error of the float product: half a step of x's rows (max |x_row| /
    127, and / 254 again for the second digit) times |W|."""
    kernel, reference = {1: ("w8a8_linear", w8a8_reference), 2: ("w8a16_linear", w8a16_reference)}[digits]
    kernel = getattr(torch.ops.nanoflant5_cpu, kernel)
    gen = torch.Generator().manual_seed(rows)
    for K, N in [(64, 1), (48, 37), (64, 1153), (128, 64), (40, 96), (72, 5)]:  # (40, 72: the scalar tails)
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        s = torch.rand(N, generator=gen) / 100
        x = torch.randn(rows, 1, 2 * K, generator=gen)[..., ::2]  # (rows, 1, K), not contiguous
        x[0, 0, 0] = 1e3  # one outlier sets the row's scale
        if rows > 1:
            x[1] = 0
        if rows >= 5:  # a row too small for a normal scale, a NaN, an infinity (last: in the scalar tail for K = 40)
            x[2], x[3, 0, 3], x[4, 0, K - 1] = 1e-36, float("nan"), float("inf")
        y = kernel(x, q, s)
        torch.testing.assert_close(y, reference(x, q, s), rtol=0, atol=0, equal_nan=True, msg=str((K, N)))
        assert y.shape == (rows, 1, N) and y[5:].isfinite().all()
        if rows > 1:
            assert not y[1].any()
        if rows >= 5:
            assert not y[2].any() and y[3:5].isnan().all()
    x = torch.randn(5, 64, generator=gen)
    layer = Int8Linear(torch.randn(40, 64, generator=gen))
    w = layer.dequantized(torch.float64)
    exact = F.linear(x.double(), w)
    step = x.abs().amax(-1, keepdim=True).double() / 127 / 2 / (254 if digits == 2 else 1)
    error = (kernel(x, layer.q, layer.scale).double() - exact).abs()
    assert (error <= step * w.abs().sum(1) + 1e-5 * exact.abs() + 1e-6).all()
    if digits == 2:  # and the second digit is what makes it finer
        assert error.max() < (w8a8_reference(x, layer.q, layer.scale).double() - exact).abs().max() / 20


@pytest.mark.skipif(not kernels.available(), reason="no C++ kernel")
@pytest.mark.parametrize("rows", [1, 5, 9, 33, 70])
def test_w8a8_float_linear_is_its_reference(rows):
    """w8a8_float_linear (w8a8 where torch._int_mm is not exact) = w8a8_reference bit for bit: the products of the
    int8 digits summed in float32 are whole numbers below 2^24 a lane, added as int32, exact even where the row's sum
    passes 2^24 (every digit and weight at +-127, K = 2048 and 8320: float32 would round it); zero, tiny, NaN and
    infinite rows as w8a8_linear's; 3-D strided inputs; past 64 rows through torch's float32 GEMM, 1024 columns at a
    time. Widths that are not a multiple of 16 or past FLOAT_SUM_K's bound are refused."""
    gen = torch.Generator().manual_seed(rows)
    kernel = torch.ops.nanoflant5_cpu.w8a8_float_linear
    for K, N in [(64, 1), (48, 37), (2048, 70), (quantize.FLOAT_SUM_K, 9)]:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        q[0] = 127
        s = torch.rand(N, generator=gen) / 100
        x = torch.randn(rows, 1, 2 * K, generator=gen)[..., ::2]  # (rows, 1, K), not contiguous
        x[0, 0], x[0, 0, 1] = 1.0, 126 / 127  # digits 127 but one 126: with q[0], an odd sum past 2^24
        if rows >= 5:
            x[1], x[2], x[3, 0, 3], x[4, 0, K - 1] = 0, 1e-36, float("nan"), float("inf")
        y = kernel(x, q, s)
        torch.testing.assert_close(y, w8a8_reference(x, q, s), rtol=0, atol=0, equal_nan=True, msg=str((K, N)))
        assert y.shape == (rows, 1, N) and y[5:].isfinite().all()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel(torch.randn(2, 40), torch.zeros(3, 40, dtype=torch.int8), torch.ones(3))
    with pytest.raises(RuntimeError, match="at most"):
        kernel(torch.randn(9, 16656), torch.zeros(1, 16656, dtype=torch.int8), torch.ones(1))


def test_w8a8_model_decodes_its_reference_whatever_the_batch(checkpoint, monkeypatch):
    """quantize="w8a8" replaces every linear layer (not the embedding); its logits, greedy and beam rows equal those
    of the same model computing each layer by w8a8_reference, and a row decodes the same alone as in a padded
    batch (each row's activations have their own scale)."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, quantize="w8a8")
    assert all(type(m) is W8A8Linear for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear)))
    ids, mask = random_batch(96, LENGTHS, seed=11)
    labels = random_batch(96, [5, 9, 2, 6], seed=12)[0]
    runs = []
    for reference in (False, True):
        if reference:  # (the class's forward, so not through decoder_block, which calls the kernel)
            monkeypatch.setattr(W8A8Linear, "forward", lambda self, x: w8a8_reference(x, self.q, self.scale))
            monkeypatch.setattr(S, "BLOCKS", False)
        logits = model(ids, mask, labels=labels)
        logits = logits[1] if isinstance(logits, tuple) else logits
        runs.append([logits] + [model.generate(ids, mask, max_new_tokens=12, **kw)
                                for kw in (dict(), dict(num_beams=3))])
    if W8A8_KERNEL:
        torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    for i, n in enumerate(LENGTHS):  # each row alone
        alone = model.generate(ids[i:i + 1, :n], max_new_tokens=12)[0]
        assert torch.equal(alone, runs[1][1][i, :len(alone)])
    assert len({tuple(r.tolist()) for r in runs[1][1]}) >= 3  # the rows differ


@pytest.mark.parametrize("name", ["gated-gelu-untied", "relu-tied", "inner-dim"])
def test_int8_model_is_transformers_with_the_int8_weights(checkpoint, name, monkeypatch):
    """quantize="int8" replaces every linear layer and the output layer (also a tied one, whose embedding stays
    float32) and nothing else: with x kept in float32, its logits are transformers' with the dequantized weights put
    in (float64 reference; float32 here, 1e-4), greedy and beam rows decoded with it are transformers' (float64
    int8-weight copy)."""
    import copy

    folder, ref = checkpoint(name)
    model = load_model(folder, quantize="int8")
    plain = load_model(folder)
    monkeypatch.setattr(quantize, "FLOAT_ROWS", 10 ** 9)  # x in float32 at any row count (see the test below)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(model.shared.weight, plain.shared.weight)
    ref = copy.deepcopy(ref)
    ours = dict(model.named_modules())
    with torch.no_grad():  # transformers' linears <- our int8 layers' weights (fused ones split back)
        for hf_block, block in zip(ref.encoder.block, model.encoder.blocks):
            set_linears(hf_block.layer[0].SelfAttention, "q k v", block.attn.qkv, "o", block.attn.o)
            set_ffn(hf_block.layer[1].DenseReluDense, block.ffn)
        for hf_block, block in zip(ref.decoder.block, model.decoder.blocks):
            set_linears(hf_block.layer[0].SelfAttention, "q k v", block.attn.qkv, "o", block.attn.o)
            set_linears(hf_block.layer[1].EncDecAttention, "q", block.cross.q, "k v", block.cross.kv, "o",
                        block.cross.o)
            set_ffn(hf_block.layer[2].DenseReluDense, block.ffn)
        if ref.lm_head.weight is ref.shared.weight:  # tied: give transformers its own output layer
            ref.lm_head.weight = torch.nn.Parameter(ref.shared.weight.detach().clone())
        ref.lm_head.weight.copy_(ours["lm_head"].dequantized(torch.float64))
    ids, mask = random_batch(96, LENGTHS, seed=11)
    labels = random_batch(96, [5, 9, 2, 6], seed=12)[0]
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).logits
    got = model(ids, mask, labels=labels)
    got = got[1] if isinstance(got, tuple) else got
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for kw in [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3)]:
        theirs = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        mine = model.generate(ids, mask, **kw)
        same = sum(torch.equal(a[:len(b)], b[:len(a)]) for a, b in zip(mine, theirs))
        assert same >= len(LENGTHS) - 1, kw  # float32 against float64: a near tie may part one row


@pytest.mark.skipif(not W8A8_KERNEL, reason="no C++ kernel, or torch._int_mm does not sum exactly here")
def test_int8_model_takes_x_to_16_bits_past_float_rows(checkpoint, monkeypatch):
    """quantize="int8" past FLOAT_ROWS rows (the encoder, beam search's 12 rows a step): its logits and rows are
    those of the same model computing each such layer by w8a16_reference (and F.linear with the widened weight for
    fewer rows), and the logits are those of x kept in float32 to well within the weights' own error."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, quantize="int8")
    ids, mask = random_batch(96, LENGTHS, seed=11)
    labels = random_batch(96, [5, 9, 2, 6], seed=12)[0]

    def reference(self, x):
        if x.numel() // x.shape[-1] > quantize.FLOAT_ROWS:
            return w8a16_reference(x, self.q, self.scale)
        return F.linear(x, self.dequantized())

    runs = []
    for how in ("kernels", "reference", "float x"):
        if how == "reference":  # (the class's forward, so not through decoder_block, which calls the kernels)
            monkeypatch.setattr(Int8Linear, "forward", reference)
            monkeypatch.setattr(S, "BLOCKS", False)
        if how == "float x":
            monkeypatch.setattr(quantize, "FLOAT_ROWS", 10 ** 9)
        logits = model(ids, mask, labels=labels)
        logits = logits[1] if isinstance(logits, tuple) else logits
        runs.append([logits, model.generate(ids, mask, max_new_tokens=12, num_beams=3)])
        if how == "kernels":
            assert "w8a16_linear" in S.last_path, S.last_path
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    same = sum(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert same >= len(LENGTHS) - 1  # (F.linear and int8_linear round differently: a near tie may part one row)
    weights_error = (runs[2][0] - load_model(folder)(ids, mask, labels=labels)).abs().max()
    assert (runs[0][0] - runs[2][0]).abs().max() < weights_error / 20


def set_linears(hf_module, *pairs):
    """hf_module's linears named in each "names" <- the (fused, split back in order) int8 layer after it."""
    for names, layer in zip(pairs[::2], pairs[1::2]):
        parts = names.split()
        for name, w in zip(parts, layer.dequantized(torch.float64).chunk(len(parts))):
            getattr(hf_module, name).weight.copy_(w)


def set_ffn(hf_ffn, ffn):
    set_linears(hf_ffn, "wi_0 wi_1" if hasattr(hf_ffn, "wi_0") else "wi", ffn.wi, "wo", ffn.wo)


def test_quantize_refuses_what_it_does_not_do(checkpoint):
    folder, _ = checkpoint("gated-gelu-untied")
    with pytest.raises(ValueError, match="expected one of int8"):
        load_model(folder, quantize="int4")
    with pytest.raises(ValueError, match="cannot be combined"):
        load_model(folder, dtype=torch.bfloat16, quantize="int8")


@pytest.mark.skipif("onednn" not in S.PACKERS or torch.bfloat16 not in S.PACKERS["onednn"].dtypes,
                    reason="oneDNN without bfloat16 here")
def test_bfloat16_packed_decoding_is_plain_bfloat16(checkpoint, monkeypatch):
    """bfloat16 on CPU, 5 or more rows: the decoding step's linears run oneDNN's GEMM on packed copies; rows and scores
    are those of plain bfloat16 decoding (F.linear)."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.bfloat16)
    ids, mask = random_batch(96, LENGTHS + [9, 4], seed=13)
    monkeypatch.setattr(S, "PACKER", "onednn")
    calls = []
    packer = S.PACKERS["onednn"]
    monkeypatch.setitem(S.PACKERS, "onednn", packer._replace(run=lambda *a: calls.append(1) or packer.run(*a)))
    for kw in [dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)]:
        calls.clear()
        rows, scores = model.generate(ids, mask, return_scores=True, **kw)
        assert len(calls) >= (6 * len(model.decoder.blocks) + 1) * (rows.shape[1] - 1) > 0
        monkeypatch.setattr(S, "PACKING", False)
        plain_rows, plain_scores = model.generate(ids, mask, return_scores=True, **kw)
        monkeypatch.setattr(S, "PACKING", True)
        assert torch.equal(rows, plain_rows), kw
        torch.testing.assert_close(scores, plain_scores, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")
def test_bfloat16_rows_linear(checkpoint, monkeypatch):
    """bfloat16, 1-4 rows: kernels.rows_linear takes bfloat16 weights (widened to float32, summed in float32, rounded
    to bfloat16 once): the float64 product to bfloat16's rounding; decoding 1-4 rows a step runs it and gives the
    rows and scores of plain bfloat16 decoding (F.linear)."""
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 4):
        for K, N in [(16, 1), (512, 1153)]:
            w = torch.randn(N, K, generator=gen).bfloat16()
            x = torch.randn(rows, 1, 2 * K, generator=gen).bfloat16()[..., ::2]
            y = torch.ops.nanoflant5_cpu.rows_linear(x, w)
            assert y.shape == (rows, 1, N) and y.dtype == torch.bfloat16
            assert _bfloat16_product(y, x, w), (K, N)
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.bfloat16)
    ids, mask = random_batch(96, LENGTHS, seed=13)
    for sl, kw in [(slice(0, 1), {}), (slice(0, 4), {}), (slice(0, 1), dict(num_beams=4))]:
        rows, scores = model.generate(ids[sl], mask[sl], max_new_tokens=20, return_scores=True, **kw)
        assert S.last_path.startswith("rows_linear"), S.last_path
        monkeypatch.setattr(S, "KERNELS", False)
        monkeypatch.setattr(S, "PACKING", False)
        plain_rows, plain_scores = model.generate(ids[sl], mask[sl], max_new_tokens=20, return_scores=True, **kw)
        monkeypatch.setattr(S, "KERNELS", True)
        monkeypatch.setattr(S, "PACKING", True)
        assert torch.equal(rows, plain_rows), kw
        torch.testing.assert_close(scores, plain_scores, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_engine_runs_the_int8_model(checkpoint, mode):
    """Continuous batching (engine.py, behind the server) with an int8 model: each greedy request gets the rows the
    int8 model's generate() gives it alone (mixed positions in one step; float32, so a near tie may part a row)."""
    from nanoflant5.engine import Engine, Request

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, quantize=mode)
    ids, mask = random_batch(96, LENGTHS * 2, seed=14)
    prompts = [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]
    engine = Engine(model, max_batch_size=3, max_new_tokens=20)
    requests = [engine.submit(Request(p, dict(max_new_tokens=20))) for p in prompts]
    while engine.busy:
        engine.step()
    same = 0
    for r, p in zip(requests, prompts):
        want = model.generate(torch.tensor([p]), max_new_tokens=20)[0]
        same += torch.equal(r.rows[0], want)
    assert same >= len(prompts) - 1


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")
def test_bfloat16_decoding_attention_on_the_kernel(tmp_path, monkeypatch):
    """bfloat16: the decoding step's self- and cross-attention run kernels.decode_attention (bfloat16 widened to
    float32, attention in float32, rounded to bfloat16 once; torch's bfloat16 SDPA took ~2 ms a call at 32 rows on
    an AMD EPYC), at every layer of every step, 1-4 rows and 8, greedy and beams (the history through the cache's
    rows); rows and scores those of decoding with torch's float32 SDPA on the widened inputs in its place."""
    from helpers import make_checkpoint

    make_checkpoint(tmp_path, "gated-gelu-untied", d_kv=16)  # (decode_attention takes heads of multiples of 16)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    calls = []
    op = torch.ops.nanoflant5_cpu.decode_attention

    def reference(q, k, v, bias, rows):
        if rows is not None:  # row b's position s is in the cache's row rows[s, b]
            s = torch.arange(k.shape[2])[:, None]
            k, v = (t.permute(0, 2, 1, 3)[rows, s].permute(1, 2, 0, 3) for t in (k, v))
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(),
                                              scale=1.0).bfloat16()

    ids, mask = random_batch(96, [7, 3, 12, 5, 9, 4, 11, 6], seed=3)
    for sl, kw in [(slice(0, 1), {}), (slice(0, 4), {}), (slice(0, 8), {}), (slice(0, 2), dict(num_beams=3))]:
        monkeypatch.setattr(torch.ops.nanoflant5_cpu, "decode_attention",
                            lambda *a: calls.append(a[0].dtype) or op(*a))
        calls.clear()
        rows, scores = model.generate(ids[sl], mask[sl], max_new_tokens=16, return_scores=True, **kw)
        steps = rows.shape[1] - 1
        assert len(calls) >= 2 * len(model.decoder.blocks) * steps and set(calls) == {torch.bfloat16}, kw
        monkeypatch.setattr(torch.ops.nanoflant5_cpu, "decode_attention", reference)
        ref_rows, ref_scores = model.generate(ids[sl], mask[sl], max_new_tokens=16, return_scores=True, **kw)
        assert torch.equal(rows, ref_rows), kw
        torch.testing.assert_close(scores, ref_scores, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not kernels.available() or not kernels.BF16_PANELS, reason="built without AVX512-BF16")
def test_bf16_panel_linear(checkpoint, monkeypatch):
    """bfloat16, 5-64 rows, on a CPU with AVX512-BF16: kernels.bf16_panel_linear (vdpbf16ps on pairs of k, float32
    sums rounded to bfloat16 once) is the float64 product to bfloat16's rounding, for every block size of rows,
    column counts off a panel's 64 and odd K; decoding with it (choose_packer's "bf16_panels"), greedy and beams,
    takes it at every linear of every step, each call's output the float64 product of its input and the layer's
    weight to bfloat16's rounding."""
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 6, 7, 13, 32, 64):
        for K, N in [(16, 1), (33, 100), (512, 1153)]:
            w = torch.randn(N, K, generator=gen).bfloat16()
            x = torch.randn(rows, 1, 2 * K, generator=gen).bfloat16()[..., ::2]  # (strided)
            y = torch.ops.nanoflant5_cpu.bf16_panel_linear(x, S.pack_bf16_panels(w), N)
            assert y.shape == (rows, 1, N) and y.dtype == torch.bfloat16
            assert _bfloat16_product(y, x, w), (rows, K, N)
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.bfloat16)
    ids, mask = random_batch(96, LENGTHS + [9, 4], seed=13)
    monkeypatch.setattr(S, "PACKER", "bf16_panels")
    calls = []
    packer = S.PACKERS["bf16_panels"]

    def run(x, packed, w, rows):  # every call's output against the float64 product of its input and the layer's weight
        y = packer.run(x, packed, w, rows)
        calls.append(_bfloat16_product(y, x, w))
        return y

    monkeypatch.setitem(S.PACKERS, "bf16_panels", packer._replace(run=run))
    for kw in [dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)]:
        calls.clear()
        rows = model.generate(ids, mask, **kw)
        assert len(calls) >= (6 * len(model.decoder.blocks) + 1) * (rows.shape[1] - 1) > 0 and all(calls), kw


def _bfloat16_product(y, x, w) -> bool:
    """Whether y is x @ w.T (bfloat16 x and w) summed in float32 and rounded to bfloat16 once: within bfloat16's
    rounding of the float64 product plus K float32 roundings of the sum of the products' magnitudes."""
    exact = F.linear(x.double(), w.double())
    bound = 2.0 ** -8 * exact.abs() + w.shape[1] * 2.0 ** -24 * F.linear(x.double().abs(), w.double().abs())
    return bool(((y.double() - exact).abs() <= bound + 1e-30).all())
