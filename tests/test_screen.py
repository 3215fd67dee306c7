"""Greedy decoding's int8 screen of the output layer (speed.OutputScreen): the full output layer's tokens."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import nanoflant5.generate as G
import nanoflant5.speed as S
from helpers import random_batch
from nanoflant5 import kernels
from nanoflant5.config import GenerationConfig
from nanoflant5.load import load_model

LENGTHS = [7, 3, 12, 5, 20, 9]
pytestmark = pytest.mark.skipif(not S.SCREEN, reason="torch without torch._int_mm")
# the int8 product through torch._int_mm, and through kernels.int8_rows and amx_rows where they are built (AVX-512
# VNNI, AMX)
KERNELS = [name for name in ("int8_rows", "amx_rows")
           if kernels.available() and {"int8_rows": kernels.INT8, "amx_rows": kernels.AMX}[name]]
# torch._int_mm sums exactly here: not on CPUs without VNNI, where oneDNN adds pairs of products in int16 (the
# screen then takes int8_rows, or the full output layer)
EXACT = S.SCREEN and S.int_mm_exact(8, 256, 1024)
exact_int_mm = pytest.mark.skipif(not EXACT, reason="torch._int_mm does not sum exactly on this CPU")
PRODUCTS = [pytest.param(None, marks=exact_int_mm)] + [
    pytest.param(name, marks=pytest.mark.skipif(name not in KERNELS, reason=f"{name} not built here"))
    for name in ("int8_rows", "amx_rows")]


def full_argmax(x, w, process):
    return S.argmax(process(F.linear(x, w).float()))


def processors(top, vocab, t=6):
    """Greedy's processors as generate runs them, aimed at the full layer's unprocessed winners `top` (M,): none;
    minimum length (bans </s>); a repetition penalty on the winners; n-gram blocking that bans them."""
    tokens = torch.randint(2, vocab, (len(top), t + 1), generator=torch.Generator().manual_seed(t))
    tokens[:, 3] = top  # generated before (penalized), after tokens[:, 2] ...
    tokens[:, t] = tokens[:, 2]  # ... which ends the row again: (tokens[:, 2], top) would repeat a 2-gram
    for g in [GenerationConfig(), GenerationConfig(min_new_tokens=t + 1), GenerationConfig(repetition_penalty=1.7),
              GenerationConfig(no_repeat_ngram_size=2)]:
        yield partial(G.process_scores, tokens=tokens, t=t, g=g, eos=1, min_keep=1)


@pytest.mark.parametrize("kernel", PRODUCTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_screen_picks_the_full_layers_token(dtype, kernel):
    """Random layers and inputs, including near-ties the int8 products cannot separate (tokens whose weights differ
    by ~1e-6), outlying input entries and an input of zeros: the screened token is the full layer's, and (but for
    the zeros, where every token ties) only a handful of tokens per row get full-precision logits. The same with
    the int8 product through kernels.int8_rows and amx_rows."""
    gen = torch.Generator().manual_seed(0)
    vocab, K = 4000, 128
    w = (torch.randn(vocab, K, generator=gen) * 0.05).to(dtype)
    w[1::2] = w[0::2] + 1e-6 * torch.randn(vocab // 2, K, generator=gen, dtype=dtype)  # pairs of near-twins
    w[7] *= 100  # a token with a large scale
    screen = S.OutputScreen(w)
    screen.kernel = kernel
    for M in (1, 3, 8, 2):
        x = torch.randn(M, K, generator=gen, dtype=dtype)
        if M == 3:
            x[:, 5], x[2, 9] = 30.0, -40.0  # outlying entries
        if M == 2:
            x[1] = 0  # every token ties: all are candidates, so the full layer runs
        top = full_argmax(x, w, lambda s: s)
        # every token of row 0 masked: the full layer gives it token 0 (the first of equal -inf logits)
        masked_row = lambda s: s.index_fill(0, torch.tensor([0]), float("-inf"))  # noqa: E731
        for process in [*processors(top, vocab), masked_row]:
            want = full_argmax(x, w, process)
            assert torch.equal(screen.argmax(screen.bounds(x), process), want), (M, dtype)
            candidates = screen.candidates(screen.bounds(x), process)
            if process is masked_row:
                assert (candidates is None) == (M <= 2)  # M = 2: a row of zeros ties; else the others are screened
            elif M != 2:
                assert candidates is not None and set(want.tolist()) <= set(candidates.tolist())
                assert len({c // 2 for c in candidates.tolist()}) <= 4 * M + 4  # near-twins come in pairs


def test_screen_falls_back_where_logits_overflow():
    """An input row whose logits go beyond float32 (a row of 1e35; the full layer gives +inf, and token 5's weights
    win there): the full output layer runs, and the other row's token is unaffected."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 64, generator=gen)
    w[5] = 1000.0
    x = torch.randn(2, 64, generator=gen)
    x[0], x[1] = -x[0].abs(), 1e35
    screen = S.OutputScreen(w)
    assert not screen.bounds(x)[3]
    assert torch.equal(screen.argmax(screen.bounds(x), lambda s: s), full_argmax(x, w, lambda s: s))


def test_screen_falls_back_where_the_int8_product_overflows():
    """Finite logits, but an int8 product that overflows float32 before the per-token scale shrinks it (a token of
    tiny weights whose int8 codes align with a huge input): the full output layer runs."""
    V, K = 16, 64
    w = torch.full((V, K), 1e-6)
    w[1] = 0
    w[1, 0] = 1.0
    w[2:] *= torch.sign(torch.randn(V - 2, K, generator=torch.Generator().manual_seed(0)))
    x = torch.full((1, K), 5e34)
    screen = S.OutputScreen(w)
    assert not screen.bounds(x)[3]
    assert torch.equal(screen.argmax(screen.bounds(x), lambda s: s), full_argmax(x, w, lambda s: s))


@pytest.mark.parametrize("epilogue", [False] + [pytest.param(True, marks=pytest.mark.skipif(
    not kernels.available(), reason="no C++ compiler to build the kernels"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@exact_int_mm
def test_screen_bound_holds_and_is_tight(dtype, epilogue, monkeypatch):
    """approx - b <= logit <= approx + b for every token, also for an input that makes Cauchy-Schwarz nearly an
    equality: x along one token's int8 rounding error e_i, and a multiple of int8 values (no input rounding), where
    the error reaches ~b (so a bound a third as large fails). With the bounds' last passes in one (epilogue:
    kernels.screen_bounds) and through torch's operators, which agree to float32 rounding."""
    monkeypatch.setattr(S, "KERNELS", epilogue)
    gen = torch.Generator().manual_seed(2)
    vocab, K = 1000, 256
    w = (torch.randn(vocab, K, generator=gen) * 0.05).to(dtype)
    screen = S.OutputScreen(w)
    scale = screen.scale.to(dtype)[:, None]
    e = w - scale * torch.round(w / scale).clamp(-127, 127)
    i = 123
    # its largest entries saturate, so that the int8 scale stays that of q_x once the OUTLIERS largest are set apart
    q_x = torch.round(127 * e[i] / e[i].abs().sort(descending=True).values[S.OUTLIERS]).clamp(-127, 127)
    xs = [torch.randn(4, K, generator=gen, dtype=dtype), (q_x * 0.01)[None], torch.zeros(1, K, dtype=dtype)]
    xs[2][0, :3] = torch.tensor([1e-40, -1e-39, 3e-41], dtype=dtype)  # subnormal in float32
    for x in xs:
        _, lower, upper, ok = screen.bounds(x)
        logits = F.linear(x, w).float()
        assert ok and (lower <= logits).all() and (logits <= upper).all()
        monkeypatch.setattr(S, "KERNELS", not epilogue)
        _, other_lower, other_upper, _ = screen.bounds(x)
        monkeypatch.setattr(S, "KERNELS", epilogue)
        for got, other in ((lower, other_lower), (upper, other_upper)):
            torch.testing.assert_close(got, other, rtol=1e-5, atol=1e-6 * float(other.abs().max()))
    _, lower, upper, _ = screen.bounds(xs[1])
    b = (upper.double() - lower.double()) / 2
    err = (F.linear(xs[1], w).float().double() - (upper.double() + lower.double()) / 2).abs()
    assert err[0, i] >= 0.9 * b[0, i]


@exact_int_mm
def test_compiled_bounds_hold():
    """bounds() compiled (as the compiled decoding step computes it, adding the outlying channels' products term by
    term) holds as eagerly, for inputs whose largest entries would otherwise set a coarse int8 scale; with the int8
    product through kernels.int8_rows (where built), the same bounds bit for bit (both products are exact), for
    several row counts through one compilation."""
    gen = torch.Generator().manual_seed(3)
    vocab, K = 1000, 120
    w = torch.randn(vocab, K, generator=gen) * 0.05
    screen = S.OutputScreen(w)
    x = torch.randn(3, K, generator=gen)
    x[:, 5], x[1, 9], x[2, 40:46] = 60.0, -90.0, 25.0  # outlying channels
    compiled = torch.compile(screen.bounds, dynamic=True)
    logits = F.linear(x, w)
    for _, lower, upper, ok in (compiled(x), screen.bounds(x)):
        assert ok and (lower <= logits).all() and (logits <= upper).all()
        assert ((upper - lower) / 2).amax() < 0.05 * logits.abs().amax()  # tight: the outlying channels in float
    for kernel in KERNELS:  # the same bounds from each kernel's product (amx_rows: inputs a multiple of 64 wide)
        w = torch.randn(vocab, 128 if kernel == "amx_rows" else K, generator=gen) * 0.05
        screen = S.OutputScreen(w)
        compiled = torch.compile(screen.bounds, dynamic=True)
        x = torch.randn(40, w.shape[1], generator=gen)
        x[:, 5], x[1, 9] = 60.0, -90.0
        for rows in (x[:3], x[:2], x[:8], x):  # 3, 2, 8 and 40 rows (int8_rows: up to 8)
            if kernel == "int8_rows" and len(rows) > 8:
                continue
            want = screen.bounds(rows), compiled(rows)
            screen.kernel = kernel
            for got, expected in zip((screen.bounds(rows), compiled(rows)), want):
                assert all(torch.equal(a, b) for a, b in zip(got, expected)), (kernel, len(rows))
            screen.kernel = None


def test_screen_falls_back_where_it_must(monkeypatch):
    """Non-finite inputs and weights take the full layer; so does an int8 product that is not exact (as with a
    kernel that saturates pairs of products in int16)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 64, generator=gen)
    screen = S.OutputScreen(w)
    x = torch.randn(2, 64, generator=gen)
    x[1, 3] = float("nan")
    assert screen.candidates(screen.bounds(x), lambda s: s) is None
    assert torch.equal(screen.argmax(screen.bounds(x), lambda s: s), full_argmax(x, w, lambda s: s))
    w_inf = w.clone()
    w_inf[3, 3] = float("inf")
    assert not S.OutputScreen(w_inf).usable
    w_tiny = w.clone()
    w_tiny[5] *= 1e-45 / w_tiny[5].abs().max()  # a row whose int8 scale would underflow to 0
    tiny = S.OutputScreen(w_tiny)
    assert torch.isfinite(tiny.norms).all()
    assert torch.equal(tiny.argmax(tiny.bounds(x[:1]), lambda s: s), full_argmax(x[:1], w_tiny, lambda s: s))
    x_big = x[:1].double() * 1e40  # float64 inputs beyond float32's range
    screen64 = S.OutputScreen(w.double())
    assert screen64.candidates(screen64.bounds(x_big), lambda s: s) is None

    def saturating(a, b):  # a + 128 (uint8) times b, pairs of products added into int16 with saturation
        pairs = ((a[:, None, :].int() + 128) * b.t()[None].int()).view(a.shape[0], b.shape[1], -1, 2).sum(-1)
        return (pairs.clamp(-2 ** 15, 2 ** 15 - 1).sum(-1) - 128 * b.int().sum(0)).int()

    monkeypatch.setattr(S, "_INT_MM_EXACT", {})
    monkeypatch.setattr(torch, "_int_mm", saturating)
    assert not S.int_mm_exact(2, 64, 512)
    assert screen.candidates(screen.bounds(x[:1].expand(2, -1).contiguous()), lambda s: s) is None
    # so greedy does without the screen where no exact kernel takes the rows (int8_rows: up to 8; amx_rows: any)
    monkeypatch.setattr(S, "KERNELS", False)  # torch._int_mm alone
    assert not screen.use_rows(8) and not screen.use_rows(32)
    monkeypatch.setattr(S, "KERNELS", True)
    assert screen.use_rows(8) == (kernels.available() and (kernels.INT8 or kernels.AMX))
    assert screen.use_rows(32) == (kernels.available() and kernels.AMX)


def test_greedy_through_the_screen_matches_transformers(checkpoint, monkeypatch):
    """Greedy generation and streaming, with processors, through the screen (checked to run and to screen) give
    transformers' rows in float64, and the full output layer's rows in float32."""
    folder, ref = checkpoint("gated-gelu-untied")
    ids, mask = random_batch(96, LENGTHS, seed=12)
    seen = []
    candidates = S.OutputScreen.candidates
    monkeypatch.setattr(S.OutputScreen, "candidates", lambda *a: seen.append(candidates(*a)) or seen[-1])
    for dtype in (torch.float64, torch.float32):
        model = load_model(folder, dtype=dtype)
        for kw in [dict(max_new_tokens=24), dict(max_new_tokens=20, min_new_tokens=8, repetition_penalty=1.5),
                   dict(max_new_tokens=20, no_repeat_ngram_size=2)]:
            seen.clear()
            got = model.generate(ids, mask, **kw)
            streamed = torch.stack(list(model.stream(ids, mask, **kw)), 1)
            screened = [c for c in seen if c is not None]
            assert len(screened) >= len(seen) // 2 > 0 and max(map(len, screened)) < 96 * S.SCREEN_MAX
            with torch.no_grad():
                want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
            monkeypatch.setattr(S, "SCREEN", False)
            full = model.generate(ids, mask, **kw)
            monkeypatch.setattr(S, "SCREEN", True)
            assert torch.equal(got, full), (dtype, kw)
            assert torch.equal(streamed, got[:, 1:streamed.shape[1] + 1]), (dtype, kw)
            if dtype == torch.float64:
                assert torch.equal(got, want), kw


def test_screen_follows_the_weights(checkpoint, monkeypatch):
    """A kept screen is remade when the output layer changes in place: a fused AdamW step (which does not bump the
    version counter), rows permuted, every row's channels permuted, one element changed; the rows stay those of the
    full layer."""
    from contextlib import nullcontext

    from nanoflant5.train import TrainArgs, loss_sum, make_optimizer

    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, LENGTHS, seed=13)

    def check():
        got = model.generate(ids, mask, max_new_tokens=20)
        monkeypatch.setattr(S, "SCREEN", False)
        full = model.generate(ids, mask, max_new_tokens=20)
        monkeypatch.setattr(S, "SCREEN", True)
        assert torch.equal(got, full)
        return got

    before = check()
    screen = S._SCREENS[model.lm_head]
    assert check() is not None and S._SCREENS[model.lm_head] is screen  # kept while unchanged
    optimizer = make_optimizer(model, TrainArgs(model="", data="", output="", lr=3e-2))
    model.train()
    loss_sum(model, ids, mask, ids, nullcontext()).backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(check(), before)
    w = model.lm_head.weight
    with torch.no_grad():
        for change in (lambda: w.copy_(w[torch.randperm(w.shape[0])]), lambda: w.copy_(w.roll(2, 1)),
                       lambda: w[5, 7].add_(3.0)):
            screen = S._SCREENS[model.lm_head]
            change()
            check()
            assert S._SCREENS[model.lm_head] is not screen


def test_screen_only_for_a_plain_output_layer(checkpoint):
    """A hook, a bias or a weight at an odd storage offset: no screen, and generate still runs the layer as it is."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float32)
    ids, mask = random_batch(96, LENGTHS, seed=14)
    greedy = model.generation_config.update(max_new_tokens=20)
    assert S.output_screen(model, greedy, 1) is not None  # greedy of 16+ steps only:
    for kw in [dict(max_new_tokens=15), dict(num_beams=2), dict(do_sample=True)]:
        assert S.output_screen(model, greedy.update(**kw), 1) is None
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([1]), -1e9))
    assert S.output_screen(model, greedy, 1) is None
    assert not (model.generate(ids, mask, max_new_tokens=20)[:, 1:] == 1).any()  # the hook banned </s>
    handle.remove()
    w = model.lm_head.weight.detach()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.cat([w.new_zeros(1), w.flatten()])[1:].view_as(w))
    assert S.output_screen(model, greedy, 1) is None
    rows = model.generate(ids, mask, max_new_tokens=20)
    model.lm_head.weight = torch.nn.Parameter(w)  # the same values, aligned: the screen's rows
    assert S.output_screen(model, greedy, 1) is not None
    assert torch.equal(model.generate(ids, mask, max_new_tokens=20), rows)
