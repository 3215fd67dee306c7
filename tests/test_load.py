"""Checkpoint loading: layouts, strict checks with clear errors, hub ids offline, and the memory it takes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint
from nanoflant5 import T5
from nanoflant5.load import checkpoint_names, resolve


@pytest.fixture
def folder(tmp_path):
    make_checkpoint(tmp_path, "gated-gelu-untied")
    return tmp_path


def edit_weights(folder, fn):
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(folder):
    edit_weights(folder, lambda s: s.pop("decoder.block.1.layer.2.DenseReluDense.wi_1.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: decoder\.block\.1\.layer\.2\.DenseReluDense\.wi_1"):
        T5.from_pretrained(folder)


def test_unexpected_tensor_is_named(folder):
    edit_weights(folder, lambda s: s.update({"encoder.block.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 tensors: encoder\.block\.9\.extra\.weight"):
        T5.from_pretrained(folder)


def test_misshaped_tensor_is_named(folder):
    edit_weights(folder, lambda s: s.update({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(32, 31)}))
    with pytest.raises(ValueError, match=r"wrong shape.*SelfAttention\.k\.weight \[32, 31\] \(expected \[32, 32\]\)"):
        T5.from_pretrained(folder)


def test_untied_config_needs_lm_head(folder):
    edit_weights(folder, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        T5.from_pretrained(folder)


def test_truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        T5.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        T5.from_pretrained(folder)


def test_missing_files(tmp_path_factory, folder):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        T5.from_pretrained(folder / "nope" / "model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        T5.from_pretrained(tmp_path_factory.mktemp("empty"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        T5.from_pretrained(folder)
    with pytest.raises(NotADirectoryError):
        T5.from_pretrained(folder / "config.json")


def test_other_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ValueError, match="not a T5 model"):
        T5.from_pretrained(folder)


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        resolve("google/flan-t5-large")


def test_hub_id_from_local_cache(tmp_path_factory, monkeypatch, folder):
    """A hub id already in the cache loads offline (the cache layout is huggingface_hub's own)."""
    tmp_path = tmp_path_factory.mktemp("cache")
    snap = tmp_path / "hub" / "models--google--flan-t5-tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--google--flan-t5-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--google--flan-t5-tiny" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("google/flan-t5-tiny") == snap
    model = T5.from_pretrained("google/flan-t5-tiny")
    assert model.config.d_model == 32


def test_names_cover_every_parameter():
    from nanoflant5 import PRESETS

    for config in PRESETS.values():
        with torch.device("meta"):
            model = T5(config)
        assert set(checkpoint_names(config)) == {n for n, _ in model.named_parameters(remove_duplicate=False)}


def test_loading_peak_memory(tmp_path):
    """Loading flan-t5-base-sized fp32 weights (990 MB) adds at most 1.3x their size to the process' peak RSS."""
    from nanoflant5 import PRESETS

    config = PRESETS["flan-t5-base"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    hf_shapes = {}
    with torch.device("meta"):
        model = T5(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    for ours, parts in checkpoint_names(config).items():
        shape = params[ours].shape
        for p in parts:
            hf_shapes[p] = (shape[0] // len(parts), *shape[1:])
    save_file({n: torch.zeros(s) for n, s in hf_shapes.items()}, tmp_path / "model.safetensors")
    weights = (tmp_path / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import json, torch
        from nanoflant5 import T5
        def status(key):  # VmRSS: resident now; VmHWM: peak resident of this program (ru_maxrss would include
            # the forking parent's memory)
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        x = torch.zeros(1) + 1  # warm up torch before measuring
        before = status("VmRSS")
        model = T5.from_pretrained({str(tmp_path)!r})
        print(json.dumps({{"before": before, "peak": status("VmHWM")}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    added = m["peak"] - m["before"]
    print(f"weights {weights / 2**20:.0f} MiB, peak RSS added by loading {added / 2**20:.0f} MiB "
          f"({added / weights:.2f}x)")
    assert added <= 1.3 * weights
