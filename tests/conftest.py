import pytest
import torch
from safetensors.torch import save_file

from tests._robustness_helpers import sha256_tree


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def inputs(tmp_path):
    """A base and two fine-tuned safetensors files in ``tmp_path/in`` (the robustness tests' inputs; other modules
    define their own ``inputs``); yields the folder, then checks that no test changed a byte of it."""
    folder = tmp_path / "in"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(16, generator=g)}
    save_file(base, str(folder / "base.safetensors"))
    for t in range(2):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / f"t{t}.safetensors"))
    before = sha256_tree(folder)
    yield folder
    assert sha256_tree(folder) == before
