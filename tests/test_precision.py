"""float16 must not overflow on FLAN-T5-like activations; float16 and bfloat16 stay close to float32."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint, random_batch
from nanoflant5 import T5

LENGTHS = [7, 3, 12, 5, 20, 9, 4, 15]


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A random checkpoint whose feed-forward outputs reach ~1e5-1e6, beyond float16's 65504, as FLAN-T5's do."""
    folder = tmp_path_factory.mktemp("overflow")
    make_checkpoint(folder, "gated-gelu-untied", seed=11)
    state = load_file(folder / "model.safetensors")
    for name in state:
        if name.endswith("DenseReluDense.wo.weight") or name.endswith("DenseReluDense.wi_1.weight"):
            state[name] = state[name] * 150.0
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_checkpoint_really_overflows_float16(overflowing):
    model = T5.from_pretrained(overflowing)
    peak = {}
    hook = model.encoder.blocks[0].ffn.register_forward_hook(lambda m, i, o: peak.setdefault("max", o.abs().max()))
    ids, mask = random_batch(96, LENGTHS, seed=1)
    with torch.no_grad():
        model(ids, mask, decoder_input_ids=torch.zeros(len(LENGTHS), 4, dtype=torch.long))
        hook.remove()
        assert peak["max"] > 65504
        naive = model.half()(ids, mask, decoder_input_ids=torch.zeros(len(LENGTHS), 4, dtype=torch.long))
    assert not torch.isfinite(naive).all()  # all-float16 weights: inf/NaN


def test_float16_stays_finite_and_close(overflowing):
    ids, mask = random_batch(96, LENGTHS, seed=2)
    dec = torch.randint(0, 96, (len(LENGTHS), 6))
    with torch.no_grad():
        exact = T5.from_pretrained(overflowing)(ids, mask, dec)
        half = T5.from_pretrained(overflowing, dtype=torch.float16)(ids, mask, dec)
    assert torch.isfinite(half).all()
    assert ((half.float() - exact).abs().max() / exact.abs().max()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_generation_mostly_equals_float32(overflowing, dtype):
    ids, mask = random_batch(96, LENGTHS * 2, seed=3)
    want = T5.from_pretrained(overflowing).generate(ids, mask, max_new_tokens=16)
    got = T5.from_pretrained(overflowing, dtype=dtype).generate(ids, mask, max_new_tokens=16)
    same = sum(torch.equal(a[:len(b)], b[:len(a)]) for a, b in zip(got, want))
    assert same >= 0.75 * len(want), f"{same}/{len(want)} rows equal"
    # and with beams
    want = T5.from_pretrained(overflowing).generate(ids, mask, max_new_tokens=12, num_beams=3)
    got = T5.from_pretrained(overflowing, dtype=dtype).generate(ids, mask, max_new_tokens=12, num_beams=3)
    assert sum(torch.equal(a[:len(b)], b[:len(a)]) for a, b in zip(got, want)) >= 0.6 * len(want)


def test_float16_training_step_stays_finite(overflowing):
    """A training forward and backward in float16 (the policy's float32 `wo`): finite loss and gradients, loss close
    to float32's."""
    from nanoflant5.train import loss_sum

    ids, mask = random_batch(96, LENGTHS, seed=4)
    labels = torch.randint(2, 96, (len(LENGTHS), 6))
    losses = {}
    for dtype in (torch.float32, torch.float16):
        model = T5.from_pretrained(overflowing, dtype=dtype).train()
        loss = loss_sum(model, ids, mask, labels, torch.autocast("cpu", enabled=False)) / labels.numel()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[dtype] = loss.item()
    assert abs(losses[torch.float16] - losses[torch.float32]) < 0.02 * abs(losses[torch.float32])
