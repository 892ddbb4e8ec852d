"""Train the shipped tiny models on tiny Shakespeare, deterministically, on a CPU.

    python -m llminfer.models.train_tiny --model tiny-shakespeare-draft
    python -m llminfer.models.train_tiny --model tiny-shakespeare

Each run trains the byte-level BPE tokenizer on the training split (deterministic, so both
models get the same one), trains a Llama-architecture model with transformers'
`LlamaForCausalLM`, keeps the checkpoint with the best validation loss, saves it in
Hugging Face format (bf16 weights) and writes a model card with the measured loss.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llminfer.chat import SHAKESPEARE_CHAT_TEMPLATE
from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.eval import nats_per_char

ASSETS = Path(__file__).resolve().parent / "assets"
EOS = "<|endoftext|>"


@dataclass
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    steps: int
    batch_size: int = 4
    seq_len: int = 1024
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.1
    eval_every: int = 100
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seed: int = 1234
    # Distillation: a shipped model (or directory) to imitate, and the weight of the KL term against it
    # (1.0: imitate only). A draft trained to agree with its target is accepted more often.
    distill_from: str | None = None
    distill_weight: float = 0.0


PRESETS = {
    # 5M parameters on 347k training tokens overfit: tied embeddings, more dropout than the draft needs, and
    # a longer schedule (with dropout 0.2, untied and 1100 steps it ended at 1.495 nats/char, behind its draft).
    "tiny-shakespeare": Preset(256, 768, 6, 8, 2, tie_word_embeddings=True, steps=1500, dropout=0.3),
    # The draft of tiny-shakespeare for speculative decoding: one layer (at batch 1 a forward pass costs about its
    # share of the operations, so fewer layers is what makes a draft cheap), distilled from its target so that
    # it proposes what the target would say. Train it after the target. (Distilled with two layers it reached
    # 1.4785 nats/char, better than its 6-layer teacher's 1.4850: on 347k tokens the teacher is limited by data,
    # and a draft as good as its target would make no sense as a draft.)
    "tiny-shakespeare-draft": Preset(128, 384, 1, 4, 2, tie_word_embeddings=True, steps=1500,
                                     distill_from="tiny-shakespeare", distill_weight=1.0),
}


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on `text`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, model_max_length=1_000_000
    )


def build_model(preset: Preset, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def add_dropout(model, p: float) -> None:
    """Residual dropout for training only: transformers' Llama has none, and this corpus is small."""

    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.down_proj.register_forward_hook(hook)


def load_teacher(name_or_path: str, tokenizer):
    """The model a draft learns to imitate; it must use the very same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llminfer.models.registry import resolve_model_path

    path = resolve_model_path(name_or_path)
    if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the teacher {name_or_path!r} has another tokenizer than the one trained here")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def distillation_loss(student_logits: torch.Tensor, teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token: the student learns the teacher's whole next-token distribution,
    not only the token that happened to come next in the text."""
    with torch.no_grad():
        target = teacher(input_ids=input_ids).logits.flatten(0, 1).log_softmax(-1)
    return F.kl_div(student_logits.log_softmax(-1), target, log_target=True, reduction="batchmean")


def flops_per_token(config, context: int) -> int:
    """Multiply-adds x 2 for one token's forward pass at `context` tokens of history."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size + 2 * context * h
    return 2 * (config.num_hidden_layers * per_layer + h * config.vocab_size)


def learning_rate(step: int, p: Preset) -> float:
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    progress = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def quick_val_loss(model, val_ids: torch.Tensor, p: Preset, windows: int = 16) -> float:
    """Mean loss per token on fixed, evenly spaced validation windows (a cheap progress signal)."""
    model.eval()
    starts = torch.linspace(0, len(val_ids) - p.seq_len - 2, windows).long()
    x = torch.stack([val_ids[s : s + p.seq_len] for s in starts])
    y = torch.stack([val_ids[s + 1 : s + p.seq_len + 1] for s in starts])
    loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


def train(name: str, out_dir: Path, steps: int | None = None, preset: Preset | None = None, log=print) -> dict:
    """Train one model end to end and save it to `out_dir`; returns the training summary."""
    from transformers import AutoModelForCausalLM

    p = preset or PRESETS[name]
    if steps is not None:
        p = Preset(**{**asdict(p), "steps": steps})
    torch.manual_seed(p.seed)
    train_text, val_text = train_val_split(tinyshakespeare_text())
    tokenizer = train_tokenizer(train_text, p.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)

    model = build_model(p, tokenizer)
    add_dropout(model, p.dropout)
    teacher = load_teacher(p.distill_from, tokenizer) if p.distill_from else None
    decay = [w for n, w in model.named_parameters() if w.dim() >= 2]
    no_decay = [w for n, w in model.named_parameters() if w.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(p.seed)
    best = (float("inf"), -1, None)
    history = []
    start = time.time()
    model.train()
    for step in range(p.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, p)
        offsets = torch.randint(0, len(train_ids) - p.seq_len - 1, (p.batch_size,), generator=gen)
        x = torch.stack([train_ids[o : o + p.seq_len] for o in offsets])
        y = torch.stack([train_ids[o + 1 : o + p.seq_len + 1] for o in offsets])
        logits = model(input_ids=x).logits.flatten(0, 1)
        loss = F.cross_entropy(logits, y.flatten())
        if teacher is not None:
            loss = (1 - p.distill_weight) * loss + p.distill_weight * distillation_loss(logits, teacher, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
            val = quick_val_loss(model, val_ids, p)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss_per_token": round(val, 4)})
            log(f"{name} step {step + 1}/{p.steps} train {loss.item():.3f} val {val:.3f} "
                f"({time.time() - start:.0f}s)")
            if val < best[0]:
                best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    train_seconds = time.time() - start

    model.load_state_dict(best[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Name the generic fast-tokenizer class so that transformers 4.x and 5.x both load it, and add the chat
    # template that stages a conversation as a scene (llminfer.chat).
    tok_config = out_dir / "tokenizer_config.json"
    tok_settings = {**json.loads(tok_config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast",
                    "chat_template": SHAKESPEARE_CHAT_TEMPLATE}
    tok_config.write_text(json.dumps(tok_settings, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out_dir)

    # The card reports the loss of the weights as shipped (bf16), reloaded by transformers.
    shipped = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    val_nats = nats_per_char(shipped, tokenizer, val_text, context=p.seq_len)
    n_params = sum(w.numel() for w in shipped.parameters())
    summary = {
        "model": name,
        "parameters": n_params,
        "val_nats_per_char": round(val_nats, 4),
        "val_chars": len(val_text),
        "val_tokens": len(val_ids),
        "train_tokens": len(train_ids),
        "chars_per_token": round(len(val_text) / len(val_ids), 3),
        "best_step": best[1],
        "flops_per_token_at_512": flops_per_token(shipped.config, 512),
        "train_seconds": round(train_seconds),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": "python -m llminfer.models.train_tiny " + shlex.join(sys.argv[1:]),
        "preset": asdict(p),
        "history": history,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(summary))
    return summary


def model_card(s: dict) -> str:
    p = s["preset"]
    return f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [llama, llminfer, tiny-shakespeare]
---

# {s['model']}

A tiny Llama-architecture language model shipped with `llminfer`, the companion package of
the book on LLM inference. It is small enough to run every chapter on a laptop CPU.

| | |
|---|---|
| architecture | Llama (RMSNorm, RoPE, SwiGLU), grouped-query attention |
| layers / hidden / MLP | {p['num_hidden_layers']} / {p['hidden_size']} / {p['intermediate_size']} |
| query heads / KV heads | {p['num_attention_heads']} / {p['num_key_value_heads']} |
| tied embeddings | {p['tie_word_embeddings']} |
| parameters | {s['parameters']:,} |
| context | {p['max_position_embeddings']} positions (trained on windows of {p['seq_len']}) |
| tokenizer | byte-level BPE, {p['vocab_size']} tokens, {s['chars_per_token']} characters per token |
| weights | bf16 safetensors |
| FLOPs per token (at 512 tokens of context) | {s['flops_per_token_at_512']:,} |

## Data

`tinyshakespeare.txt` (1,115,394 characters, public domain). The first 90% of the characters
({s['train_tokens']:,} tokens) is the training split; the last 10% ({s['val_chars']:,} characters,
{s['val_tokens']:,} tokens) is held out for validation.

## Result

Validation loss: **{s['val_nats_per_char']:.4f} nats per character**: the total negative
log-likelihood of the held-out text, in windows of {p['seq_len']} tokens, divided by its number
of characters, so it compares with character-level models. Measured on the shipped bf16
weights loaded in fp32 by `transformers`.

## Training

```
{s['command']}
```

AdamW (lr {p['lr']}, cosine to {p['min_lr']}, {p['warmup']} warm-up steps, weight decay
{p['weight_decay']}), {p['steps']} steps of {p['batch_size']} x {p['seq_len']} tokens, residual
dropout {p['dropout']}, seed {p['seed']}; the checkpoint with the best validation loss (step
{s['best_step']}) is kept. Trained in {s['train_seconds']} s on {s['machine']}, torch {s['torch']}.{distilled(p)}
"""


def distilled(p: dict) -> str:
    if not p.get("distill_from"):
        return ""
    return (f"\n\nDistilled from `{p['distill_from']}`: the loss is {1 - p['distill_weight']:g} x cross-entropy on the "
            f"text + {p['distill_weight']:g} x KL(teacher || student) per token, so that this model agrees with its "
            "teacher as often as it can (it is that model's draft for speculative decoding).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the package assets)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    args = parser.parse_args(argv)
    summary = train(args.model, args.out or ASSETS / args.model, steps=args.steps)
    print(json.dumps({k: summary[k] for k in ("model", "parameters", "val_nats_per_char", "best_step")}))


if __name__ == "__main__":
    main()
