"""The model against transformers: logits for every supported variant, long inputs, padding, dtypes."""

import pytest
import torch

from helpers import CONFIGS, random_batch
from nanoflant5 import PRESETS, T5, T5Config
from nanoflant5.load import load_model

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def both_logits(folder, ref, ids, mask, dec, dtype=torch.float64):
    ours = load_model(folder, dtype=dtype)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, mask, dec)
    return want, got


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_logits_match_transformers(checkpoint, name, fmt):
    folder, ref = checkpoint(name, fmt)
    ids, mask = random_batch(96, [7, 3, 12, 5])
    dec = torch.randint(0, 96, (4, 6))
    dec[:, 0] = 0
    want, got = both_logits(folder, ref, ids, mask, dec)
    assert got.shape == want.shape == (4, 6, 96)
    assert want.std() > 0.5  # random weights that give non-trivial logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_inputs_longer_than_max_distance(checkpoint):
    """Positions beyond relative_attention_max_distance (16 in the tiny configs) share the far buckets."""
    folder, ref = checkpoint("gated-gelu-untied")
    ids, mask = random_batch(96, [60, 45])
    dec = torch.randint(0, 96, (2, 40))
    want, got = both_logits(folder, ref, ids, mask, dec)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_labels_are_shifted_right(checkpoint):
    folder, ref = checkpoint("relu-tied")
    ids, mask = random_batch(96, [7, 4])
    labels = torch.randint(2, 96, (2, 5))
    labels[1, 3:] = -100
    ours = load_model(folder, dtype=torch.float64)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).logits
        got = ours(ids, mask, labels=labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_padding_does_not_change_a_row(checkpoint):
    folder, _ = checkpoint("gated-gelu-untied")
    model = load_model(folder, dtype=torch.float64)
    ids, mask = random_batch(96, [9, 4, 13])
    dec = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        batched = model(ids, mask, dec)
        for i, n in enumerate([9, 4, 13]):
            alone = model(ids[i:i + 1, :n], mask[i:i + 1, :n], dec[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_other_dtypes_track_float64(checkpoint, dtype):
    folder, _ = checkpoint("gated-gelu-untied")
    ids, mask = random_batch(96, [7, 3, 12, 5])
    dec = torch.randint(0, 96, (4, 6))
    with torch.no_grad():
        exact = load_model(folder, dtype=torch.float64)(ids, mask, dec)
        model = load_model(folder, dtype=dtype)
        for name, p in model.named_parameters():  # float16 policy: the FFN output projections stay float32
            assert p.dtype == (torch.float32 if dtype == torch.float16 and name.endswith("ffn.wo.weight") else dtype)
        got = model(ids, mask, dec)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    assert (got.double() - exact).abs().max() / exact.abs().max() < tol


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_presets_match_published_configs(size):
    assert T5Config.from_json(FIXTURES / f"flan-t5-{size}" / "config.json") == PRESETS[f"flan-t5-{size}"]


def test_config_rejects_other_models():
    with pytest.raises(ValueError, match="not a T5 model"):
        T5Config.from_dict({"model_type": "bart"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_dict({"model_type": "t5", "feed_forward_proj": "gated-swishy"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_dict({"model_type": "t5", "feed_forward_proj": "gated-gelu-fast"})


def test_config_round_trips_through_transformers():
    from transformers import T5Config as HFConfig

    for ours in [*PRESETS.values(), T5Config(activation="gelu_new"), T5Config(activation="silu", gated=True)]:
        d = ours.to_hf_dict()
        assert T5Config.from_dict(d) == ours
        hf = HFConfig(**d)  # transformers reads the same architecture from it
        assert (hf.is_gated_act, hf.dense_act_fn, hf.scale_decoder_outputs) == (ours.gated, ours.activation,
                                                                                 ours.scale_decoder_outputs)


def test_tied_model_shares_one_parameter(checkpoint):
    folder, _ = checkpoint("relu-tied")
    model = T5.from_pretrained(folder)
    assert model.lm_head.weight is model.shared.weight
    assert not any(p.is_meta for p in model.parameters())
    untied = T5.from_pretrained(checkpoint("gated-gelu-untied")[0])
    assert untied.lm_head.weight is not untied.shared.weight


def test_flex_attention_matches_sdpa(checkpoint):
    """The FlexAttention path (bias computed in the kernel, padding and causality as block masks) gives SDPA's
    logits, and generate() the same rows. float32: FlexAttention on CPU has no float64 and no backward."""
    folder, _ = checkpoint("gated-gelu-untied")
    model = T5.from_pretrained(folder)
    ids, mask = random_batch(96, [7, 3, 40, 5], seed=1)  # 40 > relative_attention_max_distance
    dec = torch.randint(0, 96, (4, 24))
    with torch.no_grad():
        dense = model.set_attention_backend("sdpa")(ids, mask, dec)
        rows = model.generate(ids, mask, max_new_tokens=12, num_beams=2)
        flex = model.set_attention_backend("flex")(ids, mask, dec)
        flex_rows = model.generate(ids, mask, max_new_tokens=12, num_beams=2)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-4)
    assert torch.equal(flex_rows, rows)
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("magic")
