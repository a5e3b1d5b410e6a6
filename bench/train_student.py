"""Train a small Qwen2 model from a config, to test recipes on a second architecture offline.

    python bench/train_student.py                      # 500 steps, ~25 min on one CPU core
    python bench/recipe_search.py --model out/qwen2-student --stem recipes_qwen2 ...

No second real model is reachable offline, and a randomly initialised one has flat spectra that
every method compresses alike. So this builds one with learned structure: a byte-level BPE
tokenizer and a Qwen2 decoder (q/k/v biases, 8 heads over 2 KV heads, its own widths and depth:
nothing shared with SmolLM2) trained from scratch on the first 85% of WikiText-2 valid.txt. The
recipe search calibrates on the first 90% and scores on the last 10% of that file, so its
held-out slice is text the model never saw; the WikiText-2 test split is never read here.
Writes an HF directory (model + tokenizer) to --out and bench/results/student_qwen2.json.
`train()` is the same run as a function (bench/gpu_kit.py stage 5 trains it on the GPU when no
student was carried there, and a tiny one in its CPU dry run).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import lrinfer
from lrinfer.data import load_text

OUT = Path(__file__).parent / "results"
TRAIN_FRACTION = 0.85


def build_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(vocab: int, eos: int, hidden: int = 256, intermediate: int = 768, layers: int = 6,
                heads: int = 8, kv_heads: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos)
    return Qwen2ForCausalLM(cfg)


@torch.no_grad()
def heldout_ppl(model, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    return lrinfer.perplexity(model, windows, progress=False)["ppl"]


def train(text: str, steps: int = 500, batch: int = 16, seq_len: int = 256, vocab: int = 4096, lr: float = 2e-3,
          seed: int = 0, device: str = "cpu", model_kw: dict | None = None, progress=print):
    """Tokenizer + Qwen2 student trained on the first TRAIN_FRACTION of `text`.

    Returns (model on CPU in eval mode, tokenizer, record: dict with the loss log, held-apart PPL,
    parameter count, seconds). `model_kw` overrides build_model's widths (tiny dry runs)."""
    torch.manual_seed(seed)
    cut = int(len(text) * TRAIN_FRACTION)
    train_text, rest = text[:cut], text[cut:]
    t0 = time.perf_counter()
    tok = build_tokenizer(train_text, vocab)
    ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"])
    held = torch.tensor(tok(rest[-len(rest) // 3:], add_special_tokens=False)["input_ids"])  # last ~5%
    model = build_model(len(tok), tok.eos_token_id, **(model_kw or {})).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"{ids.numel()} training tokens; Qwen2 student {n_params / 1e6:.1f}M params on {device}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    log = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,))  # CPU generator: same draws on any device
        batch_ids = torch.stack([ids[s: s + seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)})
            progress(json.dumps(log[-1]))
    model = model.cpu().eval()
    ppl = heldout_ppl(model, held, seq_len)
    record = {"train": f"first {TRAIN_FRACTION:.0%} of the characters ({ids.numel()} tokens)",
              "model": model.config.to_dict(), "params": n_params,
              "args": {"steps": steps, "batch": batch, "seq_len": seq_len, "vocab": vocab, "lr": lr, "seed": seed},
              "device": device, "seconds": round(time.perf_counter() - t0, 1),
              "final_loss": log[-1]["loss"] if log else None, "ppl_last_5pct_of_valid": ppl, "log": log}
    return model, tok, record


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/qwen2-student")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the record says which)")
    ap.add_argument("--record", default=str(OUT / "student_qwen2.json"),
                    help="where to write the training record (default bench/results/student_qwen2.json)")
    args = ap.parse_args(argv)
    text, desc = load_text("wikitext2", "calib", lrinfer.resolve_data_dir())
    print(desc, flush=True)
    model, tok, rec = train(text, args.steps, args.batch, args.seq_len, args.vocab, args.lr, args.seed, args.device,
                            progress=lambda m: print(m, flush=True))
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    command = " ".join(["python bench/train_student.py", *(sys.argv[1:] if argv is None else argv)])
    threads = f"{torch.get_num_threads()} thread(s)" if args.device == "cpu" else args.device
    record = {"command": command, "data": desc, **rec, "args": vars(args), "torch": torch.__version__,
              "host": f"{platform.machine()} CPU, {threads}"}
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(record, indent=2))
    print(f"held-apart PPL {rec['ppl_last_5pct_of_valid']:.2f}; saved to {out}", flush=True)


if __name__ == "__main__":
    main()
