"""nanoflant5's CPU kernels for decoding (kernels.rows_linear, int8_rows, rms_norm) against torch's, and decoding
with them."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import nanoflant5.speed as S
from helpers import make_checkpoint, random_batch
from nanoflant5 import kernels
from nanoflant5.load import load_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")
LENGTHS = [7, 3, 12, 5]


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_rows_linear_is_the_linear(rows):
    """Every row count, weights whose row count is not a multiple of the 4 read side by side, 3-D and strided inputs:
    the float64 product, to float32 rounding (|error| <= K * 2^-24 * sum of |x_k w_k|, with room)."""
    gen = torch.Generator().manual_seed(rows)
    for K, N in [(16, 1), (32, 7), (512, 1152), (768, 4097)]:
        w = torch.randn(N, K, generator=gen)
        x = torch.randn(rows, 1, 2 * K, generator=gen)[..., ::2]  # (rows, 1, K), not contiguous
        y = torch.ops.nanoflant5_cpu.rows_linear(x, w)
        assert y.shape == (rows, 1, N) and y.dtype == torch.float32
        exact = F.linear(x.double(), w.double())
        bound = K * 2.0 ** -24 * F.linear(x.double().abs(), w.double().abs())
        assert ((y.double() - exact).abs() <= 2 * bound + 1e-30).all(), (K, N)
        assert torch.equal(torch.ops.nanoflant5_cpu.rows_linear(x, w), y)  # the same order every call
    with pytest.raises(RuntimeError, match="1-4 rows"):
        torch.ops.nanoflant5_cpu.rows_linear(torch.randn(5, 16), torch.randn(3, 16))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.nanoflant5_cpu.rows_linear(torch.randn(1, 24), torch.randn(3, 24))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nanoflant5_cpu.rows_linear(torch.randn(1, 16, dtype=torch.float64), torch.randn(3, 16))


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 32, 64, 70])
def test_panel_linear_is_the_linear(rows):
    """panel_linear on weights packed by speed.pack_panels: every block size of rows (1-6, uneven splits), columns
    that are not a multiple of the 64 a panel holds, any width, 3-D and strided inputs: the float64 product to float32
    rounding (|error| <= K * 2^-24 * sum of |x_k w_k|, with room), the same every call."""
    gen = torch.Generator().manual_seed(rows)
    for K, N in [(1, 1), (24, 100), (512, 1152), (768, 130)]:
        w = torch.randn(N, K, generator=gen)
        packed = S.pack_panels(w)
        assert packed.shape == (-(-N // 64), K, 64)
        x = torch.randn(rows, 1, 2 * K, generator=gen)[..., ::2]  # (rows, 1, K), not contiguous
        y = torch.ops.nanoflant5_cpu.panel_linear(x, packed, N)
        assert y.shape == (rows, 1, N) and y.dtype == torch.float32
        exact = F.linear(x.double(), w.double())
        bound = K * 2.0 ** -24 * F.linear(x.double().abs(), w.double().abs())
        assert ((y.double() - exact).abs() <= 2 * bound + 1e-30).all(), (K, N)
        assert torch.equal(torch.ops.nanoflant5_cpu.panel_linear(x, packed, N), y)
    assert torch.ops.nanoflant5_cpu.panel_linear(torch.randn(0, 16), S.pack_panels(torch.randn(3, 16)), 3).shape == (0, 3)
    with pytest.raises(RuntimeError, match="packed by pack_panels"):
        torch.ops.nanoflant5_cpu.panel_linear(torch.randn(2, 16), S.pack_panels(torch.randn(3, 16)), 65)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nanoflant5_cpu.panel_linear(torch.randn(2, 16, dtype=torch.float64), S.pack_panels(torch.randn(3, 16)), 3)


@pytest.mark.parametrize("D", [16, 64, 128])
def test_decode_attention_is_attention(D):
    """decode_attention against SDPA in float64, within 2x torch's own float32 error: the decoder's self-attention on
    the KVCache's layout (with beam search's rows gathered through the index, and without), cross-attention on the
    encoder's keys with several queries a row (beams), padding masked by the float32 minimum, one key and key counts
    that are not a multiple of 16; and in bfloat16, the float32 kernel's result on the widened inputs, rounded once."""
    gen = torch.Generator().manual_seed(D)
    low = torch.finfo(torch.float32).min
    H = 3
    for B, S, G in [(1, 1, 1), (4, 17, 1), (6, 64, 3)]:
        cache = torch.randn(S + 2, B, 2, H, D, generator=gen)  # (positions, rows, k/v, H, D)
        q = torch.randn(B, 1, 3, H, D, generator=gen)[:, :, 0].transpose(1, 2)  # (B, H, 1, D), strided
        bias = torch.randn(1, H, S + 2, S + 2, generator=gen)[:, :, S - 1:S, :S]
        rows = torch.randint(0, B, (S, B), generator=gen)
        gathered = cache[torch.arange(S)[:, None], rows]  # row b's position s from row rows[s, b]
        k, v = cache[:S].permute(2, 1, 3, 0, 4)
        memory = torch.randn(B // G, S, 2, H, D, generator=gen)  # cross-attention: (B/G, H, S, D) views
        mask = torch.zeros(B // G, 1, 1, S)
        mask[0, ..., S // 2 + 1:] = low
        qg = q.transpose(1, 2).reshape(B // G, G, H, D).transpose(1, 2)  # (B/G, H, G, D)
        ck, cv = memory.permute(2, 0, 3, 1, 4)
        for args, plain in [((q, k, v, bias, None), (q, k, v, bias)),
                            ((q, k, v, bias, rows), (q, *gathered.permute(2, 1, 3, 0, 4), bias)),
                            ((qg, ck, cv, mask, None), (qg, ck, cv, mask))]:
            out = torch.ops.nanoflant5_cpu.decode_attention(*args)
            want = F.scaled_dot_product_attention(*(t.double() for t in plain), scale=1.0)
            assert out.shape == want.shape and out.dtype == torch.float32
            # within float32's first-order error bound (torch's own float32 error differs between CPUs: 1.3e-6 on
            # an AMD EPYC where ours was 3.7e-6, against 2x that on an Intel Xeon)
            err = (out.double() - want).abs()
            assert (err <= _attention_bound(*plain)).all(), (B, S, G, err.max().item())
            # bfloat16 (the bfloat16 mode): widened exactly, the same float32 arithmetic, rounded to bfloat16 once
            half = [t.clamp(min=torch.finfo(torch.bfloat16).min).bfloat16() if t is not None and t.is_floating_point()
                    else t for t in args]
            out = torch.ops.nanoflant5_cpu.decode_attention(*half)
            assert out.dtype == torch.bfloat16 and out.shape == want.shape
            exact = torch.ops.nanoflant5_cpu.decode_attention(*(t.float() if t is not None and t.is_floating_point()
                                                                 else t for t in half))
            assert torch.equal(out, exact.bfloat16()), (B, S, G)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.nanoflant5_cpu.decode_attention(q, k, v, bias, rows + B)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nanoflant5_cpu.decode_attention(q.double(), k, v, bias, None)


@pytest.mark.parametrize("D", [64, 128])
def test_full_attention_is_attention(D):
    """full_attention against SDPA in float64, within 2x torch's own float32 error: q, k and v strided as the fused
    qkv projection leaves them, one query and one key, lengths that are not a multiple of the 48 queries a tile or
    the 64 keys a panel; the bias broadcast from (1, H, T, S), whole (B, H, T, S), or T5's relative form (H, T + S - 1)
    with the padding as a (B, S) key mask (the float32 minimum)."""
    gen = torch.Generator().manual_seed(D)
    low = torch.finfo(torch.float32).min
    H = 3
    for B, T, S in [(1, 1, 1), (2, 7, 70), (3, 130, 130), (2, 49, 5)]:
        q = torch.randn(B, T, 3, H, D, generator=gen)[:, :, 0].transpose(1, 2)  # (B, H, T, D), strided
        k, v = torch.randn(B, S, 3, H, D, generator=gen)[:, :, 1:].permute(2, 0, 3, 1, 4)
        relative = torch.randn(H, T + S - 1, generator=gen) * 3
        bias = relative[:, (T - 1 - torch.arange(T))[:, None] + torch.arange(S)][None]  # (1, H, T, S)
        key_mask = torch.zeros(B, S)
        key_mask[0, S // 2 + 1:] = low
        masked = bias.masked_fill(key_mask[:, None, None, :] == low, low)  # the encoder's (B, H, T, S) bias
        for args, plain in [((q, k, v, bias, None), (q, k, v, bias)), ((q, k, v, masked, None), (q, k, v, masked)),
                            ((q, k, v, relative, key_mask), (q, k, v, masked)),
                            ((q, k, v, bias.contiguous(), key_mask), (q, k, v, masked))]:
            out = torch.ops.nanoflant5_cpu.full_attention(*args)
            want = F.scaled_dot_product_attention(*(t.double() for t in plain), scale=1.0)
            assert out.shape == want.shape and out.dtype == torch.float32
            err, torch_err = _errors(out, F.scaled_dot_product_attention(*plain, scale=1.0), want)
            assert err <= 2 * torch_err + 1e-6, (B, T, S, err, torch_err)
            assert torch.equal(torch.ops.nanoflant5_cpu.full_attention(*args), out)  # the same every call
    with pytest.raises(RuntimeError, match="relative bias"):
        torch.ops.nanoflant5_cpu.full_attention(q, k, v, relative[:, 1:], None)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        torch.ops.nanoflant5_cpu.full_attention(q, k, v, bias[..., 1:], None)
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):  # (one key's bias for all S keys)
        torch.ops.nanoflant5_cpu.full_attention(q, k, v, bias[..., :1], None)
    with pytest.raises(RuntimeError, match="shapes or strides"):
        torch.ops.nanoflant5_cpu.full_attention(q[..., :48], k[..., :48], v[..., :48], bias, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nanoflant5_cpu.full_attention(q.double(), k, v, bias, None)


def test_encoder_on_full_attention(tmp_path, monkeypatch):
    """speed.encode runs the encoder's self-attention on full_attention (heads of 64, counted), with the relative
    position bias and the padding in their compact forms: within 2x the float32 error of model.encode (SDPA on the
    (B, H, S, S) bias) against float64, a padded row as that row alone; afterwards the modules are plain again.
    Heads of another size, training, autograd and autocast keep SDPA."""
    from nanoflant5 import T5

    make_checkpoint(tmp_path, "gated-gelu-untied", d_kv=64, num_heads=2)
    model = T5.from_pretrained(tmp_path, dtype=torch.float32).eval()
    wide = T5.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids, mask = random_batch(model.config.vocab_size, [70, 9, 33])
    calls = []
    attend = S._attend_full
    monkeypatch.setattr(S, "_attend_full", lambda *a: calls.append(type(a[-1])) or attend(*a))
    with torch.inference_mode():
        fast, plain, want = S.encode(model, ids, mask), model.encode(ids, mask), wide.encode(ids, mask)
        assert calls == [S.EncoderBias] * len(model.encoder.blocks)
        err, torch_err = _errors(fast, plain, want)
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)
        alone = S.encode(model, ids[1:2, :9], mask[1:2, :9])
        torch.testing.assert_close(fast[1, :9], alone[0], rtol=1e-5, atol=1e-5)
    taken = len(calls)
    assert not any(key in m.__dict__ for m in model.modules() for key in ("attend", "attention_bias"))
    make_checkpoint(tmp_path / "d32", "gated-gelu-untied", d_kv=32, num_heads=2)
    with torch.inference_mode():
        S.encode(T5.from_pretrained(tmp_path / "d32", dtype=torch.float32).eval(), ids, mask)
    model.train()
    with torch.inference_mode():
        S.encode(model, ids, mask)
    model.eval()
    S.encode(model, ids, mask).sum().backward()  # (autograd: SDPA)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        S.encode(model, ids, mask)
    assert len(calls) == taken


@pytest.mark.skipif(not kernels.AMX, reason="amx_rows is built for CPUs with AMX (and needs the OS's leave)")
def test_amx_rows_is_exact():
    """amx_rows on amx_pack's layout against the exact product (float64 holds these sums exactly): row counts within
    one row tile, two, and past 32 (groups of rows), the int8 extremes, column counts that are not a multiple of the
    32 a block takes; inputs that are not a multiple of 64 are refused."""
    gen = torch.Generator().manual_seed(0)
    for K, N in [(64, 1), (128, 37), (512, 4099), (64, 32)]:
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
        w[0] = 127
        w[-1] = -128
        packed = torch.ops.nanoflant5_cpu.amx_pack(w)
        for M in (1, 5, 16, 17, 32, 33, 70):
            x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen)
            x[0] = -128
            x[-1] = 127
            y = torch.ops.nanoflant5_cpu.amx_rows(x, packed, N)
            assert y.dtype == torch.int32 and y.shape == (M, N)
            assert torch.equal(y.double(), x.double() @ w.double().t()), (K, N, M)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.nanoflant5_cpu.amx_pack(torch.zeros(3, 96, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="amx_pack's weight"):
        torch.ops.nanoflant5_cpu.amx_rows(torch.zeros(1, 64, dtype=torch.int8), packed, N + 32)


@pytest.mark.skipif(not kernels.INT8, reason="int8_rows is built for CPUs with AVX-512 VNNI or AVX2")
def test_int8_rows_is_exact():
    """int8_rows against the exact product (float64 holds these sums exactly): every row count, the int8 extremes,
    weights whose row count is not a multiple of the 4 read side by side, columns that are not a multiple of 64."""
    gen = torch.Generator().manual_seed(0)
    for K, N in [(1, 1), (7, 3), (64, 5), (130, 37), (512, 4099)]:
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
        w[0] = 127
        w[-1] = -128
        for M in kernels.INT8_ROWS:
            x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen)
            x[0] = -128
            x[-1] = 127
            y = torch.ops.nanoflant5_cpu.int8_rows(x, w)
            assert y.dtype == torch.int32 and y.shape == (M, N)
            assert torch.equal(y.double(), x.double() @ w.double().t()), (K, N, M)
    with pytest.raises(RuntimeError, match="1-8 rows"):
        torch.ops.nanoflant5_cpu.int8_rows(torch.zeros(9, 64, dtype=torch.int8), torch.zeros(3, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.nanoflant5_cpu.int8_rows(torch.zeros(1, 64), torch.zeros(3, 64, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 3, 130])
def test_rms_norm_is_t5s_layer_norm(rows):
    """rms_norm(x, w, eps) = w * (x * rsqrt(mean(x^2) + eps)) to float32 rounding, for widths that are and are not a
    multiple of 16, 3-D strided inputs, many rows (split between threads), the same every call."""
    gen = torch.Generator().manual_seed(rows)
    for D in (16, 24, 512):
        w = torch.randn(D, generator=gen)
        x = (torch.randn(rows, 1, 2 * D, generator=gen) * 5)[..., ::2]
        y = torch.ops.nanoflant5_cpu.rms_norm(x, w, 1e-6)
        xd = x.double()
        want = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert y.shape == x.shape and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, rtol=4e-6, atol=1e-6)
        assert torch.equal(torch.ops.nanoflant5_cpu.rms_norm(x, w, 1e-6), y)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decoding_with_the_kernel_gives_torchs_rows(checkpoint, monkeypatch, compile):
    """float32 on CPU, 1-4 rows a step: the decoder's and output layer's linears run rows_linear (fast_linears), its
    layer norms rms_norm and its activations gated_gelu (fast_layers), its attention decode_attention
    (fast_attention), and generate gives the rows of decoding with torch's kernels (scores to float32 rounding):
    greedy (1 and 4 inputs), beams (4 beams of 1 input, 2 of 2), compiled and eager. Afterwards the layers are plain
    nn.Linear again."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    with S.fast_linears(model, 3, 16):
        step_linears = [linear for b in model.decoder.blocks for linear in (b.attn.qkv, b.cross.o, b.ffn.wo)]
        assert all(m.forward.func is torch.ops.nanoflant5_cpu.rows_linear for m in step_linears + [model.lm_head])
    with S.fast_linears(model, 3, 15):  # too few steps to be worth a build on first use: torch's kernels
        assert not any("forward" in m.__dict__ for m in model.modules())
    with S.fast_layers(model):  # the layer norms and activations
        assert model.decoder.final_norm.forward.func is S._fused_norm
        assert all(b.cross_norm.forward.func is S._fused_norm and b.ffn.activation.func is S._fused_activation
                   for b in model.decoder.blocks)
    with S.fast_layers(model, compile=True):  # a compiled step fuses them itself
        assert not any("forward" in m.__dict__ for m in model.modules())
    with S.fast_attention(model):
        assert all("attend" in b.cross.__dict__ and "attend_cache" in b.attn.__dict__ for b in model.decoder.blocks)
    assert not any({"forward", "attend", "attend_cache", "activation"} & set(m.__dict__) for m in model.modules())
    ids, mask = random_batch(96, LENGTHS, seed=11)
    for sl, kw in [(slice(0, 1), {}), (slice(0, 4), {}), (slice(0, 1), dict(num_beams=4)),
                   (slice(1, 3), dict(num_beams=2, num_return_sequences=2))]:
        args = ids[sl], mask[sl]
        rows, scores = model.generate(*args, max_new_tokens=16, return_scores=True, compile=compile, **kw)
        monkeypatch.setattr(S, "KERNELS", False)
        torch_rows, torch_scores = model.generate(*args, max_new_tokens=16, return_scores=True, **kw)
        monkeypatch.setattr(S, "KERNELS", True)
        assert torch.equal(rows, torch_rows), kw
        torch.testing.assert_close(scores, torch_scores, rtol=1e-4, atol=1e-4)
        greedy = model.generate(*args, max_new_tokens=16, compile=compile, **kw)  # the int8 screen, for greedy
        assert torch.equal(greedy, rows), kw


@pytest.mark.parametrize("kind,quantize,packer", [
    ("gated-gelu-untied", None, "panels"), ("relu-tied", None, "panels"), ("gated-gelu-untied", "int8", None),
    ("gated-gelu-untied", "w8a8", None), *[("gated-gelu-untied", None, name) for name in ("onednn", "mkl")
                                           if name in S.PACKERS]])
def test_decoder_block_is_the_blocks_forward(tmp_path, kind, quantize, packer, monkeypatch):
    """kernels.decoder_block (speed.fast_blocks) runs a decoder block's decoding step in one call on the kernels the
    block's forward takes, so generations with it equal those without to the bit, scores included: 1-4 rows
    (rows_linear) and 8 (panel_linear, or oneDNN's or MKL's packed GEMM where choose_packer picks it), the int8
    modes' layers (int8_linear, w8a16_linear past 4 rows, w8a8_linear), greedy, beams (history through the cache's
    index), several sequences of an input (its copies' queries together over the encoder output), sampling, and the
    engine's steps (rows at their own positions; the engine keeps panel copies only). Each takes the kernel
    (counted) at every layer of every step."""
    from helpers import make_checkpoint
    from nanoflant5.engine import Engine, Request

    make_checkpoint(tmp_path, kind, d_kv=16)  # (decode_attention takes head sizes of multiples of 16)
    model = load_model(tmp_path, dtype=torch.float32, quantize=quantize)
    calls = []
    op = torch.ops.nanoflant5_cpu.decoder_block
    monkeypatch.setattr(torch.ops.nanoflant5_cpu, "decoder_block", lambda *a: calls.append(1) or op(*a))
    monkeypatch.setattr(S, "PACKER", packer or "panels")
    ids, mask = random_batch(96, [7, 3, 12, 5, 9, 4, 11, 6], seed=3)
    layers = len(model.decoder.blocks)
    for sl, kw in [(slice(0, 1), {}), (slice(0, 4), {}), (slice(0, 8), {}), (slice(0, 1), dict(num_beams=4)),
                   (slice(1, 3), dict(num_beams=2, num_return_sequences=2)),
                   (slice(0, 2), dict(do_sample=True, num_return_sequences=3, seed=7))]:
        args = ids[sl], mask[sl]
        calls.clear()
        rows, scores = model.generate(*args, max_new_tokens=16, return_scores=True, **kw)
        steps = rows.shape[1] - 1  # (beam search may have decoded further than its rows keep)
        assert len(calls) == layers * steps or ("num_beams" in kw and len(calls) > layers * steps), (kw, len(calls))
        monkeypatch.setattr(S, "BLOCKS", False)
        plain_rows, plain_scores = model.generate(*args, max_new_tokens=16, return_scores=True, **kw)
        monkeypatch.setattr(S, "BLOCKS", True)
        assert torch.equal(rows, plain_rows) and torch.equal(scores, plain_scores), kw
        assert not any("forward" in b.__dict__ for b in model.decoder.blocks)
    settings = [dict(max_new_tokens=20, min_new_tokens=k) for k in (4, 20, 9, 14, 20, 6)]
    got = []
    for blocks in (True, False):
        monkeypatch.setattr(S, "BLOCKS", blocks)
        calls.clear()
        engine = Engine(model, max_batch_size=4, max_new_tokens=24)
        requests = [engine.submit(Request(row[m.bool()].tolist(), kw)) for row, m, kw in zip(ids, mask, settings)]
        engine.run_until_idle()
        got.append([r.rows for r in requests])
        assert (len(calls) > 0) == blocks
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_kernel_without_compiler_falls_back(tmp_path, checkpoint):
    """No C++ compiler (and nothing built before): one warning, then decoding with torch's kernels, same rows."""
    folder, _ = checkpoint("gated-gelu-untied")
    script = f"""
import warnings, torch
from nanoflant5.load import load_model
import nanoflant5.speed as S
model = load_model({str(folder)!r}, dtype=torch.float32)
ids = torch.tensor([[5, 9, 14, 3, 1]])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rows = [model.generate(ids, max_new_tokens=16, num_beams=2) for _ in range(2)]
S.KERNELS = False
assert torch.equal(rows[0], model.generate(ids, max_new_tokens=16, num_beams=2)) and torch.equal(rows[0], rows[1])
print("|".join(str(w.message) for w in caught))
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-compiler"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    messages = out.stdout.strip().split("|")
    assert len(messages) == 1 and messages[0].startswith("nanoflant5's CPU kernel did not build"), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available()  # this process's build is unaffected


def _attention_bound(q, k, v, bias):
    """A first-order bound on float32 attention's error (softmax(q k^T + bias) v, no scaling) against float64: each
    score's sum of D products off by at most (D + 2) eps its sum of magnitudes (Higham 2002, ch. 3), which becomes a
    relative error of twice the largest score error (of the keys not masked) in the softmax's weights, plus the exp's,
    the sums' and the output's own roundings ((2 S + 8) eps), times the output's sum of magnitudes, sum_s p_s |v_s|."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    eps, D, S = 2.0 ** -24, q.shape[-1], k.shape[-2]
    masked = bias < -1e30  # (padding: weight 0 either way)
    score_err = ((D + 2) * eps * (q.abs() @ k.abs().transpose(-1, -2) + bias.abs())).masked_fill(masked, 0)
    p = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    weight_err = 2 * score_err.amax(-1, keepdim=True) + (2 * S + 8) * eps
    return weight_err * (p @ v.abs()) + 1e-12


def _errors(kernel, torch_f32, reference):
    """Largest error of the kernel's and of torch's float32 result against the float64 reference."""
    return (kernel.double() - reference).abs().max().item(), (torch_f32.double() - reference).abs().max().item()


def test_gated_gelu_and_its_gradient():
    """gated_gelu(h) = gelu_tanh(h[..., :F]) * h[..., F:] and its gradient: within 2x torch's own float32 error of
    the float64 result, for widths that are and are not a multiple of 16, large and tiny gates, strided inputs."""
    gen = torch.Generator().manual_seed(0)
    for F_ in (24, 1024):
        h = (torch.randn(3, 70, 4 * F_, generator=gen) * 4)[..., ::2]  # (3, 70, 2F), strided
        h[0, 0, :6] = torch.tensor([0.0, 1e-20, -30.0, 30.0, -4.0, 1e4])
        g = torch.randn(3, 70, F_, generator=gen)
        ours = h.detach().requires_grad_()  # (strided)
        y = torch.ops.nanoflant5_cpu.gated_gelu(ours)
        y.backward(g)
        errors = []
        for dtype in (torch.float32, torch.float64):
            t = h.to(dtype).detach().requires_grad_()
            gate, linear = t.chunk(2, -1)
            out = F.gelu(gate, approximate="tanh") * linear
            out.backward(g.to(dtype))
            errors.append((out.detach(), t.grad))
        (torch_y, torch_grad), (ref_y, ref_grad) = errors
        for kernel, theirs, ref in ((y.detach(), torch_y, ref_y), (ours.grad, torch_grad, ref_grad)):
            mine, torchs = _errors(kernel, theirs, ref)
            assert mine <= 2 * torchs + 1e-30, (F_, mine, torchs)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_gradient(weight_grad):
    """rms_norm's gradients (x, and the weight's when it trains): within 2x torch's float32 error of float64
    autograd, many rows (split between threads) and a width not a multiple of 16."""
    gen = torch.Generator().manual_seed(1)
    for rows, D in ((1, 24), (1000, 512)):
        x0, w0 = torch.randn(rows, D, generator=gen) * 3, torch.rand(D, generator=gen) + 0.5
        g = torch.randn(rows, D, generator=gen)
        results = []
        for kernel, dtype in ((True, torch.float32), (False, torch.float32), (False, torch.float64)):
            x, w = x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_(weight_grad)
            y = torch.ops.nanoflant5_cpu.rms_norm(x, w, 1e-6) if kernel else F.rms_norm(x, (D,), w, 1e-6)
            y.backward(g.to(dtype))
            results.append((x.grad, w.grad))
        (dx, dw), (torch_dx, torch_dw), (ref_dx, ref_dw) = results
        mine, torchs = _errors(dx, torch_dx, ref_dx)
        assert mine <= 2 * torchs, (rows, D, mine, torchs)
        if weight_grad:
            mine, torchs = _errors(dw, torch_dw, ref_dw)
            assert mine <= 2 * torchs, (rows, D, mine, torchs)
        else:
            assert dw is None


def test_token_losses_are_cross_entropy():
    """token_losses (speed.cross_entropy_sum) = F.cross_entropy(reduction="sum", ignore_index=-100) and its gradient,
    to torch's float32 error: ignored rows, a vocabulary not a multiple of 16, -inf and huge logits; a label out of
    range is an error."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 1003, generator=gen) * 6
    logits[0, 0, :3] = torch.tensor([-float("inf"), 80.0, -80.0])
    labels = torch.randint(0, 1003, (2, 9), generator=gen)
    labels[0, 0], labels[1, ::3] = 1, -100
    results = []
    for fn, dtype in ((S.cross_entropy_sum, torch.float32), (None, torch.float32), (None, torch.float64)):
        x = logits.to(dtype, copy=True).requires_grad_()
        loss = (fn(x, labels) if fn else
                F.cross_entropy(x.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (torch_loss, torch_grad), (ref_loss, ref_grad) = results
    for kernel, theirs, ref in ((loss, torch_loss, ref_loss), (grad, torch_grad, ref_grad)):
        mine, torchs = _errors(kernel, theirs, ref)
        assert mine <= 2 * torchs + 1e-6, (mine, torchs)
    assert grad[1, ::3].abs().max() == 0  # ignored rows
    with pytest.raises(RuntimeError, match="out of range"):
        S.cross_entropy_sum(logits, torch.full((2, 9), 1003))


@pytest.mark.parametrize("lora_targets", [None, ["q", "v"]])
def test_training_step_with_fused_layers(checkpoint, lora_targets):
    """A training step inside speed.fused_layers, with cross_entropy_sum: its loss and every trained gradient as close
    to the float64 step's as the step with torch's float32 ops (full fine-tuning and LoRA, with padding); the fused
    ops do run, and the layers are the model's own again afterwards."""
    from helpers import random_labels
    from nanoflant5 import T5, lora
    from nanoflant5.model import FeedForward, RMSNorm

    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder, dtype=torch.float32).train()
    model.set_dropout(0.0)
    if lora_targets:
        lora.add_adapters(model, lora_targets, r=4, alpha=8)
        for m in lora.adapted(model).values():
            for b in m.lora_B.values():
                torch.nn.init.normal_(b, std=0.5)
    ids, mask = random_batch(model.config.vocab_size, [7, 4, 6])
    labels = random_labels(model.config.vocab_size, [5, 3, 1])

    def step(loss_fn, dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        loss = loss_fn(model(ids, mask, labels=labels), labels)
        loss.backward()
        return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}

    def torch_loss(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    plain = step(torch_loss, torch.float32)
    with S.fused_layers(model), torch.autograd.profiler.profile() as prof:
        fused = step(S.cross_entropy_sum, torch.float32)
    reference = step(torch_loss, torch.float64)
    calls = {e.name for e in prof.function_events}
    assert {"nanoflant5_cpu::rms_norm_backward", "nanoflant5_cpu::gated_gelu_backward",
            "nanoflant5_cpu::token_losses_backward"} <= calls

    def error(result):  # the loss's relative error, and the largest gradient error relative to its tensor's largest
        loss, grads = result
        assert grads.keys() == reference[1].keys() and grads
        return max([abs(loss - reference[0]) / abs(reference[0])] + [
            ((g - reference[1][n]).abs().max() / reference[1][n].abs().max()).item() for n, g in grads.items()])

    assert error(fused) <= max(4 * error(plain), 1e-6), (error(fused), error(plain))
    assert all("forward" not in m.__dict__ and "activation" not in m.__dict__
               for m in model.modules() if isinstance(m, (RMSNorm, FeedForward)))


def test_encode_in_parts_with_fused_layers(checkpoint, monkeypatch):
    """speed.encode (generate's encoder pass): a long batch in parts of whole rows, with fused layer norms and
    activations, gives model.encode's rows to float32 rounding, padding included; a short batch is one part."""
    from nanoflant5 import T5

    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = random_batch(model.config.vocab_size, [9, 4, 7, 2, 9])
    parts = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda i, m: parts.append(len(i)) or encode(i, m))
    with torch.inference_mode():
        whole = encode(ids, mask)
        monkeypatch.setattr(S, "ENCODE_TOKENS", 18)  # 2 rows of 9 tokens a part
        fast = S.encode(model, ids, mask)
        assert parts == [2, 2, 1]
        torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(S, "ENCODE_TOKENS", 1024)
        torch.testing.assert_close(S.encode(model, ids, mask), whole, rtol=1e-5, atol=1e-5)
        assert parts == [2, 2, 1, 5]


@pytest.mark.skipif("onednn" not in S.PACKERS, reason="torch without oneDNN's packed GEMM")
def test_encoder_on_onednns_packed_gemm(checkpoint, monkeypatch):
    """Where encoder_gemm picks oneDNN's packed GEMM (as it measures on AMD CPUs), speed.encode runs every encoder
    linear on it (counted) from ENCODE_PACK_TOKENS tokens and gives model.encode's rows to float32 rounding; fewer
    tokens, or int8 layers, keep F.linear; afterwards the layers are plain again. The packed copies are kept for the
    next call (not packed again) while the weights are unchanged, and packed afresh for a changed weight. The measured
    choice is one of the two and kept for the process."""
    from nanoflant5 import T5

    assert S.encoder_gemm(torch.float32) in (None, "mkl", "onednn") and torch.float32 in S._ENCODER_GEMM
    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = random_batch(model.config.vocab_size, [9, 4, 7, 2, 9])
    monkeypatch.setattr(S, "_ENCODER_GEMM", {torch.float32: "onednn"})
    calls = []
    run = S.PACKERS["onednn"].run
    monkeypatch.setitem(S.PACKERS, "onednn", S.PACKERS["onednn"]._replace(
        run=lambda *a, **k: calls.append(1) or run(*a, **k)))
    linears = 4 * len(model.encoder.blocks)
    with torch.inference_mode():
        whole = model.encode(ids, mask)
        monkeypatch.setattr(S, "ENCODE_PACK_TOKENS", ids.numel())
        torch.testing.assert_close(S.encode(model, ids, mask), whole, rtol=1e-5, atol=1e-5)
        assert len(calls) == linears
        packs = []
        pack = S.PACKERS["onednn"].pack
        monkeypatch.setitem(S.PACKERS, "onednn", S.PACKERS["onednn"]._replace(
            pack=lambda *a: packs.append(1) or pack(*a)))
        torch.testing.assert_close(S.encode(model, ids, mask), whole, rtol=1e-5, atol=1e-5)  # the kept copies
        assert len(calls) == 2 * linears and not packs
        with torch.no_grad():
            model.encoder.blocks[0].ffn.wi.weight.mul_(2.0)
        torch.testing.assert_close(S.encode(model, ids, mask), model.encode(ids, mask), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3 * linears and len(packs) == 1
        monkeypatch.setattr(S, "ENCODE_PACK_TOKENS", ids.numel() + 1)
        S.encode(model, ids, mask)
        assert len(calls) == 3 * linears
        assert not any("forward" in m.__dict__ for m in model.modules())
        monkeypatch.setattr(S, "ENCODE_PACK_TOKENS", 1)
        q = T5.from_pretrained(folder, dtype=torch.float32, quantize="int8").eval()
        S.encode(q, ids, mask)
        assert len(calls) == 3 * linears


@pytest.mark.skipif("mkl" not in S.PACKERS, reason="torch built without MKL")
def test_encoder_on_mkls_packed_gemm(checkpoint, monkeypatch):
    """Where encoder_gemm picks MKL's packed GEMM (packed for ENCODE_TOKENS rows), speed.encode runs every encoder
    linear on it (counted) for calls of two or more parts of exactly ENCODE_TOKENS tokens, giving model.encode's rows
    to float32 rounding, the copies kept for the next call; not for parts of another size or a single part."""
    from nanoflant5 import T5

    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder, dtype=torch.float32).eval()
    monkeypatch.setattr(S, "_ENCODER_GEMM", {torch.float32: "mkl"})
    monkeypatch.setattr(S, "ENCODE_TOKENS", 16)
    monkeypatch.setattr(S, "ENCODE_PACK_TOKENS", 1)
    calls, packs = [], []
    mkl = S.PACKERS["mkl"]
    monkeypatch.setitem(S.PACKERS, "mkl", mkl._replace(run=lambda *a, **k: calls.append(1) or mkl.run(*a, **k),
                                                       pack=lambda *a: packs.append(a[1]) or mkl.pack(*a)))
    linears = 4 * len(model.encoder.blocks)
    with torch.inference_mode():
        ids, mask = random_batch(model.config.vocab_size, [8, 5, 8, 3, 8], seed=1)  # parts of 2, 2 and 1 rows of 8
        torch.testing.assert_close(S.encode(model, ids, mask), model.encode(ids, mask), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3 * linears and packs == [16] * linears
        S.encode(model, ids, mask)
        assert len(calls) == 6 * linears and len(packs) == linears  # (the kept copies)
        for lengths in ([6] * 7, [8] * 4):  # parts of 12 tokens; one part of 32 tokens
            ids, mask = random_batch(model.config.vocab_size, lengths, seed=2)
            torch.testing.assert_close(S.encode(model, ids, mask), model.encode(ids, mask), rtol=1e-5, atol=1e-5)
        assert len(calls) == 6 * linears
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or not kernels.available(),
                    reason="needs an x86 CPU with AVX-512 to run as one with AVX2 only")
def test_the_kernels_on_an_avx2_cpu():
    """The kernels built and run as on a CPU with AVX2 but no AVX-512 (AMD Zen 2/3, Intel's client CPUs: 8-lane
    vectors, int8_rows on vpmaddwd), in a process where torch, its GEMMs and the kernels are limited to AVX2
    (kernels.AS_CPU["avx2"]; oneDNN's int8 GEMM there adds pairs of products in int16, so torch._int_mm is not exact
    and the screen and w8a8 take int8_rows or do without it): this file's, the screen's and the int8 modes' tests
    pass there too (but compiled decoding: torch.compile's own code, ~60 s to compile afresh)."""
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                        "not avx2 and not compiled",
                        __file__, os.path.join(here, "test_screen.py"), os.path.join(here, "test_quantize.py")],
                       env=dict(os.environ, **kernels.AS_CPU["avx2"]), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
