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
def _deterministic():
    torch.manual_seed(0)
