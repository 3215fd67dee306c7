import pytest
import torch

from helpers import make_checkpoint, reference


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, fmt) -> (folder, transformers' float64 model of it); built once per session."""
    built = {}

    def get(name="gated-gelu-untied", fmt="safetensors"):
        if (name, fmt) not in built:
            folder = tmp_path_factory.mktemp(f"{name}-{fmt}")
            make_checkpoint(folder, name, fmt=fmt)
            built[name, fmt] = folder, reference(folder)
        return built[name, fmt]

    return get


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    import nanoflant5.speed

    torch.manual_seed(0)
    # generate()'s default compiles once a model's eager decoding has taken as long as compiling: not in tests that
    # do not ask for it (test_generate.py tests the rule)
    monkeypatch.setattr(nanoflant5.speed, "COMPILE_AUTO", False)
